"""The engine's surface: what the RPCs take and return, and ``EngineClient``, free of protobuf
and Ray.

The conversion module (``saescope.service.convert``) maps these to and from the wire types of
``saescope.api.v1`` by shape: a field here has its wire field's name, and its enum-valued
``Literal``s are the words of that enum's vocabulary (``saescope.api.v1.vocabulary``; a test
keeps them equal). The engine works on these alone. Dense arrays are float32 numpy arrays.

``EngineClient`` is the engine as the Ray app sees it (as vLLM's front end sees its
``EngineClient``): the app depends on it, never on ``Engine``'s insides. ``UNARY_RPCS`` lists
the RPCs that are one engine call on one request; the app serves each of them by shape alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

if TYPE_CHECKING:
    from saescope.service.activations import ActivationsPart, ActivationsPlan
    from saescope.service.streams import GenerationHandle

Aggregation = Literal["max", "mean", "sum"]
InterventionMode = Literal["clamp", "add", "multiply", "ablate"]
InterventionScope = Literal["all", "prompt", "generated"]
FinishReason = Literal["length", "eos", "stop"]
Branch = Literal["steered", "baseline"]


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
class Token:
    id: int
    text: str
    start: int  # character span in the rendered text; -1 where unknown
    end: int
    special: bool = False


@dataclass(frozen=True)
class TokenizeRequest:
    prompt: Prompt


@dataclass(frozen=True)
class Tokenized:
    text: str  # the rendered prompt (template applied)
    tokens: list[Token]


@dataclass(frozen=True)
class Sparse:
    """Parallel feature ids and values, strongest first."""

    features: list[int]
    values: list[float]


# ---- info ---------------------------------------
@dataclass(frozen=True)
class Limits:
    """Per-call limits (``config.LimitsConfig`` documents each); over them: OUT_OF_RANGE."""

    max_prompts: int = 64
    max_tokens_per_prompt: int = 1024
    max_top_k: int = 256
    max_new_tokens: int = 512
    max_features: int = 64
    max_contrast_prompts: int = 256
    max_stop_strings: int = 16
    max_stop_string_chars: int = 256
    max_tokens_per_call: int = 16384
    max_response_bytes: int = 3 * 2**20


@dataclass(frozen=True)
class SaeInfo:
    sae_id: str
    hookpoint: str
    layer: int
    d_in: int
    d_sae: int
    architecture: str
    k: int
    metrics: dict[str, float]
    tokens_seen: int
    has_catalog: bool = False


@dataclass(frozen=True)
class Info:
    model: str
    dtype: str
    device: str
    num_layers: int
    d_model: int
    vocab_size: int
    has_chat_template: bool
    saes: list[SaeInfo]
    default_sae_id: str
    limits: Limits
    version: str


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
class ActivationsResult:
    sae_id: str
    prompts: list[PromptActivations]


# ---- steering ---------------------------------------
@dataclass(frozen=True)
class Intervention:
    feature: int
    mode: InterventionMode
    value: float = 0.0
    scope: InterventionScope = "all"


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


@dataclass(frozen=True)
class FeatureTrace:
    feature: int
    original: list[float]  # what the SAE read, prompt then generated positions
    steered: list[float]  # after the edit


@dataclass(frozen=True)
class Completion:
    text: str
    tokens: list[Token]
    logprobs: list[float]
    finish_reason: FinishReason
    trace: list[FeatureTrace]


@dataclass(frozen=True)
class GenerateResult:
    sae_id: str
    prompt_tokens: list[Token]
    steered: Completion
    baseline: Completion | None = None


@dataclass(frozen=True)
class TokenEvent:
    """One streamed token of one branch."""

    branch: Branch
    index: int
    token: Token
    text: str  # text this token adds to the completion
    logprob: float | None
    trace: list[float]  # steered features' values after the edit, interventions order


# ---- contrast search ---------------------------------------
@dataclass(frozen=True)
class ContrastRequest:
    positive: list[Prompt]
    negative: list[Prompt]
    sae_id: str = ""
    aggregation: Aggregation = "max"
    top_n: int = 10
    locations_per_hit: int = 0


@dataclass(frozen=True)
class FeatureLocation:
    positive: bool
    prompt_index: int
    token_index: int
    token: str
    value: float


@dataclass(frozen=True)
class ContrastHit:
    feature: int
    mean_positive: float
    mean_negative: float
    mean_difference: float
    effect_size: float  # Hedges' g
    auroc: float
    p_value: float  # two-sided Mann–Whitney U
    p_value_corrected: float  # Benjamini–Hochberg over features_tested
    frac_active_positive: float
    frac_active_negative: float
    locations: list[FeatureLocation]


@dataclass(frozen=True)
class ContrastResult:
    sae_id: str
    positive_hits: list[ContrastHit]
    negative_hits: list[ContrastHit]
    features_tested: int


# ---- single feature ---------------------------------------
@dataclass(frozen=True)
class FeatureRequest:
    feature: int
    sae_id: str = ""
    top_logits: int = 10
    neighbours: int = 10
    include_direction: bool = False


@dataclass(frozen=True)
class TokenScore:
    id: int
    token: str
    score: float


@dataclass(frozen=True)
class Neighbour:
    feature: int
    cosine: float  # between decoder directions


@dataclass(frozen=True)
class ActivatingExample:
    tokens: list[Token]
    values: list[float]
    max_value: float


@dataclass(frozen=True)
class FeatureResult:
    sae_id: str
    feature: int
    decoder_norm: float
    encoder_norm: float
    encoder_bias: float
    density: float | None
    promoted: list[TokenScore]
    suppressed: list[TokenScore]
    nearest: list[Neighbour]  # highest cosine first
    top_examples: list[ActivatingExample]
    direction: np.ndarray | None  # (d_in,) float32


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

    def tokenize(self, req: TokenizeRequest) -> Tokenized: ...

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

    def feature(self, req: FeatureRequest) -> FeatureResult: ...

    def close(self) -> None: ...


UNARY_RPCS: dict[str, Callable[..., Any]] = {
    "Tokenize": EngineClient.tokenize,
    "SearchFeaturesByContrast": EngineClient.contrast,
    "GetFeature": EngineClient.feature,
}
"""RPC → the ``EngineClient`` method that answers it alone, on the request's domain type."""
