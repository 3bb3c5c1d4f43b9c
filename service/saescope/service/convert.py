"""Protobuf ⇄ domain types: the only module besides the app that knows ``saescope.api.v1``.

Conversion is by shape (``saescope.api.v1.shapes``): a request message becomes the engine's
domain type (``types.py``) with the same field names, and a result becomes its response message,
with no per-RPC code. Enums become words of their vocabulary (``saescope.api.v1.vocabulary``).
Written by hand here is only what the shapes do not say: a ``Prompt`` (a ``oneof``), packed
``DenseTensor``s, and the stream's event wrapper.

What only the wire can get wrong is an ``InvalidArgument`` naming the field: an unset oneof
(``prompts[2]``), an unset or unknown enum (``interventions[0].mode``), an unset required
message (``prompt``). Scalars pass through as sent: the engine validates them, applies the
.proto's "0 means the default" rules and checks the configured limits. Dense arrays travel as
packed little-endian float32 bytes plus their shape.
"""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np
from google.protobuf.message import Message

from saescope.api.v1 import saescope_pb2 as pb
from saescope.api.v1.shapes import Codec, Shapes
from saescope.api.v1.vocabulary import WireError
from saescope.service import types as t
from saescope.service.errors import InvalidArgument

T = TypeVar("T")
M = TypeVar("M", bound=Message)


# ---- what the shapes do not say ------------------------------------------------------------
def dense_to_proto(array: np.ndarray) -> pb.DenseTensor:
    """Row-major little-endian float32 bytes plus the shape."""
    data = np.ascontiguousarray(array, dtype="<f4")
    return pb.DenseTensor(shape=list(data.shape), data=data.tobytes())


def dense_from_proto(tensor: pb.DenseTensor, field: str = "tensor") -> np.ndarray:
    shape = tuple(int(s) for s in tensor.shape)
    if any(s < 0 for s in shape) or len(tensor.data) != 4 * int(np.prod(shape, dtype=np.int64)):
        raise WireError(field, f"{len(tensor.data)} bytes do not hold float32 {shape}")
    return np.frombuffer(tensor.data, dtype="<f4").reshape(shape).astype(np.float32)


def prompt_from_proto(prompt: pb.Prompt, field: str) -> t.Prompt:
    kind = prompt.WhichOneof("kind")
    if kind == "text":
        return t.Prompt(text=prompt.text)
    if kind == "chat":
        messages = tuple(t.ChatMessage(m.role, m.content) for m in prompt.chat.messages)
        return t.Prompt(chat=messages, add_generation_prompt=prompt.chat.add_generation_prompt)
    raise WireError(field, "set either text or chat")


SHAPES = Shapes(
    {
        "saescope.api.v1.DenseTensor": Codec(decode=dense_from_proto, encode=dense_to_proto),
        "saescope.api.v1.Prompt": Codec(decode=prompt_from_proto),
    }
)


# ---- requests: wire → domain; results: domain → wire ----------------------------------------
def request(message: Message, cls: type[T]) -> T:
    """The domain request ``cls`` of a wire request; wire mistakes name their field."""
    try:
        return SHAPES.decode(message, cls)
    except WireError as e:
        raise InvalidArgument(e.field, e.message) from None


def response(result: Any, message_cls: type[M]) -> M:
    """The wire response ``message_cls`` of a domain result."""
    return SHAPES.encode(result, message_cls)


def generate_event(item: t.TokenEvent | t.GenerationResult) -> pb.GenerateSteeredEvent:
    """A streamed token, or (for the final result) the ``done`` event."""
    if isinstance(item, t.GenerationResult):
        return pb.GenerateSteeredEvent(done=response(item, pb.GenerateSteeredResponse))
    return pb.GenerateSteeredEvent(token=response(item, pb.GenerateSteeredEvent.TokenEvent))
