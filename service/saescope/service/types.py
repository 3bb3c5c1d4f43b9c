"""The engine's surface: what the RPCs take and return, and ``EngineClient``, free of protobuf
and Ray.

Results the SDK returns as they are come from ``saescope.client.results`` (one dataclass per
result shape, shared by the engine and the SDK: ``Info``, ``Tokenization``,
``GenerationResult``, ``ContrastResult``, ``Feature``, ``Attribution``, ``FeaturePage``,
``FeatureSearch`` and their parts), and the words of the API's vocabularies (``Aggregation``,
``InterventionMode``, ``Scope``, ``Branch``, ``Matched``) from the SDK's ``inputs`` and
``results``; defined here are the requests (the SDK builds those
from keyword arguments) and what only the engine has: prompts, and activations held as arrays.
The conversion module (``saescope.service.convert``) maps them to and from the wire types of
``saescope.api.v1`` by shape: a field has its wire field's name, and its enum-valued
``Literal``s are the words of that enum's vocabulary (``saescope.api.v1.vocabulary``; a test
keeps them equal). Dense arrays are float32 numpy arrays.

``EngineClient`` is the engine as the Ray app sees it (as vLLM's front end sees its
``EngineClient``): the app depends on it, never on ``Engine``'s insides. ``UNARY_RPCS`` lists
the RPCs that are one engine call on one request; the app serves each of them by shape alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

from saescope.client.inputs import Aggregation as Aggregation
from saescope.client.inputs import InterventionMode as InterventionMode
from saescope.client.inputs import OrderBy as OrderBy
from saescope.client.inputs import Scope as Scope
from saescope.client.results import ActivatingExample as ActivatingExample
from saescope.client.results import Attribution as Attribution
from saescope.client.results import Branch as Branch
from saescope.client.results import Completion as Completion
from saescope.client.results import ContrastHit as ContrastHit
from saescope.client.results import ContrastResult as ContrastResult
from saescope.client.results import DetectionScore as DetectionScore
from saescope.client.results import Feature as Feature
from saescope.client.results import FeatureAttribution as FeatureAttribution
from saescope.client.results import FeatureLabel as FeatureLabel
from saescope.client.results import FeatureLocation as FeatureLocation
from saescope.client.results import FeaturePage as FeaturePage
from saescope.client.results import FeatureSearch as FeatureSearch
from saescope.client.results import FeatureSummary as FeatureSummary
from saescope.client.results import FeatureTrace as FeatureTrace
from saescope.client.results import Firing as Firing
from saescope.client.results import GenerationResult as GenerationResult
from saescope.client.results import Histogram as Histogram
from saescope.client.results import Info as Info
from saescope.client.results import Limits as Limits
from saescope.client.results import Matched as Matched
from saescope.client.results import Neighbour as Neighbour
from saescope.client.results import QuantileBin as QuantileBin
from saescope.client.results import SaeInfo as SaeInfo
from saescope.client.results import SearchHit as SearchHit
from saescope.client.results import Token as Token
from saescope.client.results import TokenEvent as TokenEvent
from saescope.client.results import Tokenization as Tokenization
from saescope.client.results import TokenScore as TokenScore

if TYPE_CHECKING:
    from saescope.service.activations import ActivationsPart, ActivationsPlan
    from saescope.service.streams import GenerationHandle

FinishReason = Literal["length", "eos", "stop"]  # what the engine says (never "unspecified")


# ---- prompts and tokens ---------------------------------------
@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class Prompt:
    """Plain ``text``, or a ``chat`` rendered with the model's chat template."""

    text: str | None = None
    chat: tuple[ChatMessage, ...] | None = None
    add_generation_prompt: bool = False


@dataclass(frozen=True)
class TokenizeRequest:
    prompt: Prompt


@dataclass(frozen=True)
class Sparse:
    """Parallel feature ids and values, strongest first."""

    features: list[int]
    values: list[float]


# ---- activations ---------------------------------------
@dataclass(frozen=True)
class ActivationsRequest:
    prompts: list[Prompt]
    sae_id: str = ""
    top_k_per_token: int = 0
    feature_ids: list[int] = field(default_factory=list)
    top_k_aggregated: int = 0
    aggregation: Aggregation = "max"
    include_special_tokens: bool = False
    sae_ids: list[str] = field(default_factory=list)  # several SAEs, one forward pass


@dataclass(frozen=True)
class PromptActivations:
    tokens: list[Token]
    token_top_features: list[Sparse]  # one per token (empty list when top_k_per_token == 0)
    feature_values: np.ndarray  # (T, len(feature_ids)) float32
    top_features: Sparse  # aggregated over tokens
    error_norms: list[float]  # ‖x − x̂‖ per token
    residual_norms: list[float]  # ‖x‖ per token
    out_of_distribution: list[bool]  # per token: a position the SAE never saw in training


@dataclass(frozen=True)
class SaeActivations:
    sae_id: str
    prompts: list[PromptActivations]


@dataclass(frozen=True)
class ActivationsResult:
    sae_id: str
    prompts: list[PromptActivations]
    by_sae: list[SaeActivations] = field(default_factory=list)  # with ``sae_ids``


# ---- steering ---------------------------------------
@dataclass(frozen=True)
class Condition:
    """Where an intervention applies: ``feature``'s value, or the residual's projection on
    ``direction`` (``x · v/‖v‖``), above ``threshold``; exactly one of the two is set."""

    feature: int | None = None
    direction: np.ndarray | None = field(default=None, compare=False)  # (d_in,)
    threshold: float = 0.0


@dataclass(frozen=True)
class Intervention:
    feature: int  # ignored by vector modes (``direction``)
    mode: InterventionMode
    value: float = 0.0
    scope: Scope = "all"
    direction: np.ndarray | None = field(default=None, compare=False)  # (d_in,) vector modes
    condition: Condition | None = None  # None: every position in scope


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class GenerateRequest:
    prompt: Prompt
    sae_id: str = ""
    interventions: list[Intervention] = field(default_factory=list)
    sampling: Sampling = Sampling()
    include_baseline: bool = False
    include_logprobs: bool = False
    include_trace: bool = False


# ---- contrast search ---------------------------------------
@dataclass(frozen=True)
class ContrastRequest:
    positive: list[Prompt]
    negative: list[Prompt]
    sae_id: str = ""
    aggregation: Aggregation = "max"
    top_n: int = 10
    locations_per_hit: int = 0
    order_by: OrderBy = "effect_size"
    include_output_scores: bool = False


# ---- single feature ---------------------------------------
@dataclass(frozen=True)
class FeatureRequest:
    feature: int
    sae_id: str = ""
    top_logits: int = 10
    neighbours: int = 10
    include_direction: bool = False
    examples_page_size: int = 0  # 0: the default page (catalog only)
    examples_page_token: str = ""
    quantile_examples: int = 0  # per bin; 0: all the catalog holds


# ---- the catalog: listing and search ---------------------------------------
@dataclass(frozen=True)
class ListFeaturesRequest:
    sae_id: str = ""
    page_size: int = 0  # 0: the default page
    page_token: str = ""
    min_density: float | None = None
    max_density: float | None = None
    label_contains: str = ""


@dataclass(frozen=True)
class SearchFeaturesRequest:
    query: str
    sae_id: str = ""
    top_n: int = 0  # 0: the default


# ---- attribution ---------------------------------------
@dataclass(frozen=True)
class AttributeRequest:
    """The target is ``target_token``, or ``target_text`` (one token), or (neither set) the
    model's own most likely next token."""

    prompt: Prompt
    sae_id: str = ""
    target_token: int | None = None
    target_text: str = ""
    top_n: int = 10


# ---- the engine's interface ---------------------------------------
class DecodeQueue(Protocol):
    """What the app reads of the engine's decode batcher (stats and metrics)."""

    @property
    def active_rows(self) -> int: ...

    @property
    def pending(self) -> int: ...

    @property
    def steps(self) -> int: ...


class EngineClient(Protocol):
    """The engine as the Ray app sees it; ``saescope.service.engine.Engine`` implements it.

    Calls block (the app runs them on worker threads); errors are ``errors.SaescopeError``.
    """

    slice_tokens: int
    """Tokens per part of an activation call: what the app's forward batcher interleaves."""
    batcher: DecodeQueue

    def info(self) -> Info: ...

    def tokenize(self, req: TokenizeRequest) -> Tokenization: ...

    def plan_activations(self, req: ActivationsRequest) -> ActivationsPlan:
        """Validate and tokenise; the plan's ``parts`` go to ``run_activation_parts``."""
        ...

    def run_activation_parts(self, parts: list[ActivationsPart]) -> list[list[PromptActivations]]:
        """Per part, its prompts' activations (parts of several calls, batched together)."""
        ...

    def submit_generate(
        self, req: GenerateRequest, request_id: str | None = None
    ) -> GenerationHandle:
        """Validate and queue a generation; iterate the handle for its events."""
        ...

    def contrast(self, req: ContrastRequest) -> ContrastResult: ...

    def feature(self, req: FeatureRequest) -> Feature: ...

    def attribute(self, req: AttributeRequest) -> Attribution: ...

    def list_features(self, req: ListFeaturesRequest) -> FeaturePage: ...

    def search_features(self, req: SearchFeaturesRequest) -> FeatureSearch: ...

    def close(self) -> None: ...


UNARY_RPCS: dict[str, Callable[..., Any]] = {
    "Tokenize": EngineClient.tokenize,
    "SearchFeaturesByContrast": EngineClient.contrast,
    "GetFeature": EngineClient.feature,
    "AttributeFeatures": EngineClient.attribute,
    "ListFeatures": EngineClient.list_features,
    "SearchFeatures": EngineClient.search_features,
}
"""RPC → the ``EngineClient`` method that answers it alone, on the request's domain type."""
