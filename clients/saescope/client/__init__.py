"""saescope's Python SDK: ``Client`` (sync) and ``AsyncClient`` over gRPC, typed results, errors.

    from saescope.client import Client, clamp

    with Client("localhost:9000") as client:
        acts = client.activations("The cat sat on the mat", top_k=3)
        steered = client.generate("My favourite animal is", interventions=[clamp(42, 10.0)])

Light by design: imports grpcio and protobuf only (never torch, ray or numpy).
"""

from saescope.client._channel import RetryPolicy
from saescope.client.aio import AsyncClient
from saescope.client.client import Client
from saescope.client.errors import (
    Cancelled,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    SaescopeError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    Unknown,
)
from saescope.client.inputs import (
    Chat,
    ChatMessage,
    Condition,
    Intervention,
    ablate,
    add,
    clamp,
    direction,
    multiply,
)
from saescope.client.results import (
    ActivatingExample,
    Activations,
    Attribution,
    Completion,
    ContrastHit,
    ContrastResult,
    Feature,
    FeatureAttribution,
    FeatureLocation,
    FeatureTrace,
    FeatureValue,
    Firing,
    GenerationResult,
    Info,
    Limits,
    Neighbour,
    PromptActivations,
    SaeInfo,
    Token,
    TokenActivations,
    TokenEvent,
    Tokenization,
    TokenScore,
)
from saescope.client.streams import AsyncTokenStream, StreamItem, TokenStream

__all__ = [
    "ActivatingExample",
    "Activations",
    "AsyncClient",
    "AsyncTokenStream",
    "Attribution",
    "Cancelled",
    "Chat",
    "ChatMessage",
    "Client",
    "Completion",
    "Condition",
    "ContrastHit",
    "ContrastResult",
    "DeadlineExceeded",
    "Feature",
    "FeatureAttribution",
    "FeatureLocation",
    "FeatureTrace",
    "FeatureValue",
    "Firing",
    "GenerationResult",
    "Info",
    "Internal",
    "Intervention",
    "InvalidArgument",
    "Limits",
    "Neighbour",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "PromptActivations",
    "ResourceExhausted",
    "RetryPolicy",
    "SaeInfo",
    "SaescopeError",
    "StreamItem",
    "Token",
    "TokenActivations",
    "TokenEvent",
    "TokenScore",
    "TokenStream",
    "Tokenization",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "ablate",
    "add",
    "clamp",
    "direction",
    "multiply",
]
