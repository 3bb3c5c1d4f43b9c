"""Typed results of every call: plain frozen dataclasses, free of protobuf.

One dataclass per result shape, with its response message's field names: the SDK decodes
responses into them by shape, and the service's engine returns them too
(``saescope.service.types`` imports them), so each shape is written once besides the .proto.
``TokenActivations``/``PromptActivations``/``Activations`` are the SDK's own (the engine holds
activations as arrays).

Feature values are in the paper's convention (``f_i · ‖W_dec,i‖``, unit-norm decoder directions,
model units). Every result has ``to_dict()`` (JSON-ready); the array-shaped ones have
``to_numpy()``, which imports numpy only when called (the bare install has no numpy).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

if TYPE_CHECKING:
    import numpy as np

FinishReason: TypeAlias = Literal["length", "eos", "stop", "unspecified"]
Branch: TypeAlias = Literal["steered", "baseline"]


class _Result:
    """Shared helpers of the result dataclasses."""

    def to_dict(self) -> dict[str, Any]:
        """The result as nested dicts and lists (``json.dumps`` takes it as is)."""
        return dataclasses.asdict(self)  # type: ignore[call-overload, no-any-return]


def _numpy() -> Any:
    try:
        import numpy
    except ModuleNotFoundError:
        raise ModuleNotFoundError("to_numpy() needs numpy: pip install numpy") from None
    return numpy


# ---- tokens and info ----------------------------------------------------------------------
@dataclass(frozen=True)
class Token(_Result):
    """A token of a prompt or completion."""

    id: int
    text: str
    """The token decoded on its own."""
    start: int
    """Character span ``[start, end)`` in the rendered prompt; -1 where unknown."""
    end: int
    special: bool = False
    """BOS, EOS, chat-template markers and other special tokens."""


@dataclass(frozen=True)
class FeatureValue(_Result):
    """A feature and its value (at a token, or aggregated over a prompt)."""

    feature: int
    value: float


@dataclass(frozen=True)
class SaeInfo(_Result):
    """One SAE loaded by the service."""

    sae_id: str
    hookpoint: str
    """Module whose output the SAE reads, e.g. ``model.layers.15``."""
    layer: int
    d_in: int
    d_sae: int
    """Number of features."""
    architecture: str
    """``"relu"``, ``"topk"``, ``"batchtopk"``, ``"jumprelu"`` or ``"matryoshka"``."""
    k: int
    """Active features per token (topk only; 0 otherwise)."""
    metrics: dict[str, float]
    """Training and evaluation metrics (L0, FVU, dead fraction, ...)."""
    tokens_seen: int
    has_catalog: bool = False
    """Whether the SAE has a feature catalog: ``feature()`` returns its label and examples,
    ``list_features()`` answers, and ``search_features()`` matches labels too."""
    origin: str = "saescope"
    """Which library wrote the SAE: ``"saescope"``, ``"saelens"`` or ``"sparsify"``."""
    state: str = "loaded"
    """``"loaded"`` (resident) or ``"unloaded"`` (out of memory under the replica's SAE
    budget: a call for it loads it, evicting the least recently used)."""
    memory_bytes: int = 0
    """Bytes of its tensors as served."""


@dataclass(frozen=True)
class Limits(_Result):
    """The service's limits (defaults: the service's own); calls over them raise ``OutOfRange``."""

    max_prompts: int = 64
    max_tokens_per_prompt: int = 1024
    max_top_k: int = 256
    max_new_tokens: int = 512
    max_features: int = 64
    """Chosen features per activation call, and interventions per generation."""
    max_contrast_prompts: int = 256
    """Prompts per side of a contrast search."""
    max_stop_strings: int = 16
    """Stop strings per generation."""
    max_stop_string_chars: int = 256
    """Characters of one stop string."""
    max_tokens_per_call: int = 16384
    """Tokens of all prompts of one activation call, or of both sides of a contrast search."""
    max_response_bytes: int = 3 * 2**20
    """Estimated bytes of one activation response (tokens × (top_k + chosen features))."""


@dataclass(frozen=True)
class Info(_Result):
    """What the service has loaded (``Client.info()``)."""

    model: str
    dtype: str
    device: str
    num_layers: int
    d_model: int
    vocab_size: int
    has_chat_template: bool
    saes: list[SaeInfo]
    default_sae_id: str
    """The SAE a call uses when it names none."""
    limits: Limits
    version: str
    """The server's saescope version."""
    sae_memory_budget_bytes: int = 0
    """The replica's budget for resident SAEs (0: none, every SAE stays loaded)."""
    sae_memory_bytes: int = 0
    """What the loaded SAEs take now."""

    def sae(self, sae_id: str | None = None) -> SaeInfo:
        """The SAE named ``sae_id`` (default: the service's default SAE)."""
        wanted = sae_id or self.default_sae_id
        for sae in self.saes:
            if sae.sae_id == wanted:
                return sae
        raise KeyError(f"no SAE {wanted!r}; loaded: {[s.sae_id for s in self.saes]}")


@dataclass(frozen=True)
class Tokenization(_Result):
    """A prompt as the model sees it (``Client.tokenize()``)."""

    text: str
    """The rendered prompt (chat template applied)."""
    tokens: list[Token]

    @property
    def ids(self) -> list[int]:
        """The vocabulary ids, in order."""
        return [t.id for t in self.tokens]

    def __len__(self) -> int:
        return len(self.tokens)

    def __iter__(self) -> Iterator[Token]:
        return iter(self.tokens)


# ---- activations --------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenActivations(_Result):
    """One token of a prompt with what the SAE read there."""

    token: Token
    top_features: list[FeatureValue]
    """The token's strongest features, strongest first (``top_k`` of them)."""
    feature_values: list[float]
    """The chosen ``features``' values at this token, in request order."""
    error_norm: float
    """‖x − x̂‖: how much of the residual stream the SAE misses here."""
    residual_norm: float
    """‖x‖, to put ``error_norm`` in proportion."""
    out_of_distribution: bool = False
    """A position the SAE never saw in training (the attention sink at a prompt's start, or a
    residual norm far above the prompt's median): its feature values are not meaningful, and
    the prompt's ``top_features`` leave it out."""

    @property
    def text(self) -> str:
        return self.token.text

    @property
    def relative_error(self) -> float:
        """``error_norm / residual_norm`` (0 for a zero residual)."""
        return self.error_norm / self.residual_norm if self.residual_norm else 0.0


@dataclass(frozen=True)
class PromptActivations(_Result):
    """One prompt's activations: its tokens, each with its top features, plus aggregates."""

    tokens: list[TokenActivations]
    feature_ids: list[int]
    """The chosen features (the ``features=`` argument), columns of ``feature_values``."""
    top_features: list[FeatureValue]
    """The prompt's strongest features aggregated over tokens, strongest first."""

    @property
    def feature_values(self) -> list[list[float]]:
        """The chosen features' values, one row per token: shape (tokens, len(feature_ids))."""
        return [t.feature_values for t in self.tokens]

    def values_of(self, feature: int) -> list[float]:
        """One chosen feature's value at every token."""
        try:
            column = self.feature_ids.index(feature)
        except ValueError:
            raise KeyError(f"feature {feature} was not requested: {self.feature_ids}") from None
        return [t.feature_values[column] for t in self.tokens]

    @property
    def error_norms(self) -> list[float]:
        return [t.error_norm for t in self.tokens]

    @property
    def residual_norms(self) -> list[float]:
        return [t.residual_norm for t in self.tokens]

    def to_numpy(self) -> np.ndarray:
        """``feature_values`` as a float32 array of shape (tokens, len(feature_ids))."""
        np_ = _numpy()
        array = np_.asarray(self.feature_values, dtype=np_.float32)
        return array.reshape(len(self.tokens), len(self.feature_ids))  # type: ignore[no-any-return]

    def __len__(self) -> int:
        return len(self.tokens)

    def __iter__(self) -> Iterator[TokenActivations]:
        return iter(self.tokens)


@dataclass(frozen=True)
class Activations(_Result):
    """``Client.activations()``: one ``PromptActivations`` per prompt, in request order."""

    sae_id: str
    prompts: list[PromptActivations]

    def __getitem__(self, index: int) -> PromptActivations:
        return self.prompts[index]

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self) -> Iterator[PromptActivations]:
        return iter(self.prompts)


# ---- generation ---------------------------------------------------------------------------
@dataclass(frozen=True)
class FeatureTrace(_Result):
    """A steered feature's values over prompt then generated positions."""

    feature: int
    original: list[float]
    """What the SAE read (before the edit)."""
    steered: list[float]
    """What the residual stream carried (after the edit)."""


@dataclass(frozen=True)
class Firing(_Result):
    """Where a conditional intervention applied."""

    intervention: int
    """Its index in the request's interventions."""
    positions: list[int]
    """Positions over the prompt then the generated tokens (as ``FeatureTrace``'s values)."""


@dataclass(frozen=True)
class Completion(_Result):
    """The text one branch (steered or baseline) generated."""

    text: str
    """Generated text, stop string removed."""
    tokens: list[Token]
    logprobs: list[float]
    """log p(token), one per token, when ``logprobs=True``."""
    finish_reason: FinishReason
    trace: list[FeatureTrace]
    """Per steered feature, when ``trace=True``."""
    fired: list[Firing] = field(default_factory=list)
    """Per conditional intervention (``Intervention.when``), the positions where it applied."""


@dataclass(frozen=True)
class GenerationResult(_Result):
    """``Client.generate()``, and the last item of ``Client.stream()``."""

    sae_id: str
    prompt_tokens: list[Token]
    steered: Completion
    baseline: Completion | None = None
    """The unsteered completion with the same seed, when ``baseline=True``."""

    @property
    def text(self) -> str:
        """The steered completion's text."""
        return self.steered.text


@dataclass(frozen=True)
class TokenEvent(_Result):
    """One streamed token of one branch."""

    branch: Branch
    index: int
    """Position of this token among the branch's generated tokens."""
    token: Token
    text: str
    """Text this token adds to the completion (may be empty mid-character)."""
    logprob: float | None
    trace: list[float]
    """The steered features' values here after the edit, in interventions order."""
    fired: list[int] = field(default_factory=list)
    """The conditional interventions (their indices) that applied at the position that
    predicted this token."""


# ---- contrast search ----------------------------------------------------------------------
@dataclass(frozen=True)
class FeatureLocation(_Result):
    """A place where a feature fired."""

    positive: bool
    """True: in the positive set."""
    prompt_index: int
    token_index: int
    token: str
    value: float


@dataclass(frozen=True)
class ContrastHit(_Result):
    """A feature that fires differently on the two prompt sets, with its statistics."""

    feature: int
    mean_positive: float
    mean_negative: float
    mean_difference: float
    effect_size: float
    """Hedges' g (pooled SD, small-sample corrected)."""
    auroc: float
    """P(a positive prompt's aggregate > a negative one's), ties counting half."""
    p_value: float
    """Two-sided Mann–Whitney U test."""
    p_value_corrected: float
    """Benjamini–Hochberg over every feature tested."""
    frac_active_positive: float
    frac_active_negative: float
    locations: list[FeatureLocation]
    output_score: float | None = None
    """How much adding the feature moves the next-token distribution onto the tokens it
    promotes, in [-1, 1] (high: an output feature, good for steering; near 0: it only reads
    its input). Present when asked for (``output_scores=True`` or
    ``order_by="output_score"``)."""


@dataclass(frozen=True)
class ContrastResult(_Result):
    """``Client.contrast()``: features ranked both ways by effect size."""

    sae_id: str
    positive_hits: list[ContrastHit]
    """More active with the concept, strongest first."""
    negative_hits: list[ContrastHit]
    """More active without it, strongest first."""
    features_tested: int
    difference_in_means: list[float] | None = None
    """Mean residual stream of the positive set minus the negative set's, at the SAE's
    hookpoint (d_in floats; AxBench's DiffMean): steer with ``direction(...)`` of it."""
    difference_in_means_norm: float = 0.0
    """Its Euclidean norm, in model units."""

    def to_numpy(self) -> np.ndarray:
        """``difference_in_means`` as a float32 array of shape (d_in,)."""
        if self.difference_in_means is None:
            raise ValueError("no difference_in_means: the server did not send one")
        return _numpy().asarray(self.difference_in_means, dtype="float32")  # type: ignore[no-any-return]


# ---- one feature --------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenScore(_Result):
    """An output token and its direct-logit-attribution score."""

    id: int
    token: str
    score: float


@dataclass(frozen=True)
class Neighbour(_Result):
    """A nearby feature by decoder cosine."""

    feature: int
    cosine: float


@dataclass(frozen=True)
class ActivatingExample(_Result):
    """A text where the feature fires, with its value at each token (from the catalog: to
    1/255 of ``max_value``)."""

    tokens: list[Token]
    values: list[float]
    max_value: float
    max_position: int = 0
    """Index in ``tokens`` of the token where the feature takes ``max_value``."""

    @property
    def max_token(self) -> Token:
        """The token where the feature fires most."""
        return self.tokens[self.max_position]


@dataclass(frozen=True)
class QuantileBin(_Result):
    """Examples whose value lies in ``[lower, upper)`` (the last bin: everything above)."""

    lower: float
    upper: float
    examples: list[ActivatingExample]


@dataclass(frozen=True)
class Histogram(_Result):
    """A feature's nonzero values over the catalog's tokens: ``counts[i]`` in
    ``[edges[i], edges[i+1])`` (the last bin includes values above the last edge)."""

    edges: list[float]
    counts: list[int]

    @property
    def total(self) -> int:
        """Tokens where the feature fired."""
        return sum(self.counts)


@dataclass(frozen=True)
class DetectionScore(_Result):
    """How well a label's evidence predicts where the feature fires (held-out contexts)."""

    f1: float
    precision: float
    recall: float
    balanced_accuracy: float
    positives: int
    negatives: int


@dataclass(frozen=True)
class FeatureLabel(_Result):
    """A feature's label: its characteristic tokens and n-grams (log-odds against the catalog's
    text), the scripts and languages it fires in, and how well that predicts it."""

    text: str
    """Short text, e.g. ``"ocean · sea · waves"``; empty for a feature that never fired."""
    tokens: list[TokenScore]
    ngrams: list[TokenScore]
    """``score``: log-odds; ``id``: 0 (n-grams are text)."""
    scripts: dict[str, float]
    languages: dict[str, float]
    detection: DetectionScore | None = None
    """None when the held-out contexts had too few firings to score."""
    explanation: str = ""
    """An LLM's explanation, when the catalog was built with an explainer."""


@dataclass(frozen=True)
class Feature(_Result):
    """``Client.feature()``: one feature of one SAE."""

    sae_id: str
    feature: int
    decoder_norm: float
    encoder_norm: float
    encoder_bias: float
    density: float | None
    """Fraction of training tokens on which it fired; None when unknown."""
    promoted: list[TokenScore]
    """Output tokens its decoder direction promotes, strongest first."""
    suppressed: list[TokenScore]
    nearest: list[Neighbour]
    top_examples: list[ActivatingExample]
    """One page of the strongest examples (catalog only), strongest first."""
    direction: list[float] | None
    """The unit decoder direction (d_in floats), when ``direction=True``."""
    next_examples_page_token: str = ""
    """Pass as ``examples_page_token=`` for the next page of ``top_examples``; empty: the last."""
    quantile_examples: list[QuantileBin] = field(default_factory=list)
    """Examples from activation-quantile bins, lowest bin first (catalog only)."""
    histogram: Histogram | None = None
    label: FeatureLabel | None = None
    cofiring: list[Neighbour] = field(default_factory=list)
    """Features that fire with it most; ``cosine`` is P(that one fires | this one fires)."""
    catalog_tokens: int = 0
    """Tokens the catalog was built over (0: no catalog)."""

    def to_numpy(self) -> np.ndarray:
        """``direction`` as a float32 array of shape (d_in,)."""
        if self.direction is None:
            raise ValueError("no direction: call feature(..., direction=True)")
        return _numpy().asarray(self.direction, dtype="float32")  # type: ignore[no-any-return]


# ---- attribution --------------------------------------------------------------------------
@dataclass(frozen=True)
class FeatureAttribution(_Result):
    """A feature's share of the target's log-probability (activation × gradient)."""

    feature: int
    attribution: float
    """Σ_t f_i(t) (w_i · g(t)) over the positions the SAE reads: ablating the feature moves
    log p(target) by about −attribution."""
    per_token: list[float]
    """Per prompt token: f_i(t) (w_i · g(t)); 0 where the SAE does not read."""
    max_value: float
    """The feature's largest value over the positions the SAE reads."""


@dataclass(frozen=True)
class Attribution(_Result):
    """``Client.attribute()``: which features make the model predict ``target``.

    With ``x(t)`` the residual stream the SAE reads and ``g(t)`` the gradient of
    ``log p(target)`` with respect to it, ``total = Σ_t x(t)·g(t)`` splits exactly into
    ``features_total + error + bias + skipped`` (first order; see the .proto).
    """

    sae_id: str
    prompt_tokens: list[Token]
    read: list[bool]
    """Per prompt token: whether the SAE reads its position (not special, not out of
    distribution)."""
    target: Token
    target_logprob: float
    """log p(target | prompt) under the model as it is."""
    features: list[FeatureAttribution]
    """The ``top_n`` features with non-zero attribution, largest |attribution| first."""
    features_total: float
    """Σ of every feature's attribution, not only those listed."""
    error: float
    """The SAE's error term's attribution (what its features miss)."""
    error_per_token: list[float]
    bias: float
    """The decoder bias's attribution."""
    skipped: float
    """The attribution of the positions the SAE does not read, whole."""
    total: float
    """Σ_t x(t)·g(t) = features_total + error + bias + skipped."""


# ---- the catalog: listing and search ------------------------------------------------------
Matched: TypeAlias = Literal["text", "activation", "both"]
MATCHED: tuple[Matched, ...] = ("text", "activation", "both")
"""Which half of a feature search found a hit: its label and contexts, its activation on the
query, or both."""


@dataclass(frozen=True)
class FeatureSummary(_Result):
    """One feature of a listing: its label and density from the catalog."""

    feature: int
    density: float
    label: str
    label_f1: float | None = None
    """The label's detection F1 (None: unscored)."""
    max_value: float = 0.0
    """Its largest value in the catalog."""


@dataclass(frozen=True)
class FeaturePage(_Result):
    """``Client.list_features()``: one page of features, in feature order."""

    sae_id: str
    features: list[FeatureSummary]
    next_page_token: str
    """Pass as ``page_token=`` for the next page; empty: the last page."""
    total: int
    """Features that pass the filters, over every page."""

    def __len__(self) -> int:
        return len(self.features)

    def __iter__(self) -> Iterator[FeatureSummary]:
        return iter(self.features)


@dataclass(frozen=True)
class SearchHit(_Result):
    """A feature found by a text query, with what matched."""

    feature: int
    score: float
    """Reciprocal-rank fusion of the two matches."""
    text_score: float | None
    """BM25 of the query against its label and example contexts (None: no match)."""
    activation_score: float | None
    """Its largest value on the query, over its catalog max where there is one (None: it did
    not fire on the query)."""
    matched: Matched
    label: str = ""
    density: float | None = None


@dataclass(frozen=True)
class FeatureSearch(_Result):
    """``Client.search_features()``: features for a text query, best first."""

    sae_id: str
    hits: list[SearchHit]
    has_catalog: bool
    """Without a catalog, hits come from activation only."""

    def __len__(self) -> int:
        return len(self.hits)

    def __iter__(self) -> Iterator[SearchHit]:
        return iter(self.hits)
