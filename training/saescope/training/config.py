"""The training run's configuration: typed sections, YAML files and ``key.sub=value`` overrides.

Every field has a docstring; choices are ``Literal``; unknown keys are rejected. Validation
errors come out as ``section.field: message`` lines (``ConfigError``), which the CLI prints as
``saescope train: error: train.lr: Input should be greater than 0``. The whole config is saved
beside the weights (``saescope.json``'s ``config``), so a checkpoint says how it was made.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from saescope.training.data import DataConfig


class ConfigError(ValueError):
    """A configuration that does not validate; the message names each bad field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class SAESection(_Section):
    """Shape of the SAE."""

    architecture: str = "relu"
    """``relu``: the paper's L1 SAE (Templeton et al. 2024); ``topk``: Gao et al. 2024 with AuxK;
    ``batchtopk``, ``jumprelu``, ``matryoshka``: see ``saescope.training.architectures``."""
    d_sae: int | None = Field(default=None, gt=0)
    """Number of features. Give this or ``expansion_factor`` (default: 8 × d_in)."""
    expansion_factor: int | None = Field(default=None, gt=0)
    """Features per residual dimension, d_sae = expansion_factor × d_in."""
    k: int | None = Field(default=None, gt=0)
    """Active features per token (a mean over the batch for batchtopk and matryoshka); required
    by topk, batchtopk and matryoshka, refused by the others."""
    options: dict[str, Any] = {}
    """The architecture's own settings, checked by it: jumprelu ``bandwidth``,
    ``init_threshold``, ``l0_coefficient``; batchtopk ``threshold_rate``; matryoshka
    ``prefixes`` (e.g. ``sae.options.prefixes=[128,512,2048]``) and ``threshold_rate``."""

    @model_validator(mode="after")
    def _check(self) -> Self:
        from saescope.training.sae import SAEConfig  # the architecture's own checks

        if self.d_sae is not None and self.expansion_factor is not None:
            raise ValueError("expansion_factor: give d_sae or expansion_factor, not both")
        # d_sae may depend on d_in, unknown here: check with the widest SAE; build_trainer
        # checks again with the real one.
        SAEConfig(1, self.d_sae or 2**31, self.architecture, self.k, self.options)
        return self

    def resolve_d_sae(self, d_in: int) -> int:
        """Number of features for a residual stream of width ``d_in``."""
        if self.d_sae is not None:
            return self.d_sae
        return (self.expansion_factor or 8) * d_in


class TrainSection(_Section):
    """Optimisation: the paper's recipe (DESIGN §4) with its defaults."""

    total_tokens: int = Field(default=1_000_000, gt=0)
    """Training tokens; steps = total_tokens // batch_size."""
    batch_size: int = Field(default=4096, gt=0)
    """Tokens per optimiser step."""
    lr: float = Field(default=2e-4, gt=0)
    """Adam learning rate (peak; decayed linearly to 0 over the last ``lr_decay_frac``)."""
    l1_coefficient: float = Field(default=5.0, ge=0)
    """λ of the relu loss; the paper uses ~5 with inputs scaled so that E‖x‖² = d_in."""
    l1_warmup_frac: float = Field(default=0.05, ge=0, le=1)
    """Fraction of steps over which λ rises linearly from 0 (the paper: 5%)."""
    lr_decay_frac: float = Field(default=0.2, ge=0, le=1)
    """Fraction of steps at the end over which the lr falls linearly to 0 (the paper: 20%)."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """Adam's (β1, β2); no weight decay."""
    grad_clip: float | None = Field(default=1.0, gt=0)
    """Clip the gradient's global norm to this (None: no clipping)."""
    scale_batches: int = Field(default=8, gt=0)
    """Batches used to estimate the normalisation scale s with E‖s·x‖² = d_in."""
    aux_k: int = Field(default=256, gt=0)
    """``topk``: dead features the AuxK loss reconstructs the residual with (Gao et al.: 512)."""
    aux_k_coeff: float = Field(default=1 / 32, ge=0)
    """``topk``: weight α of the AuxK loss (Gao et al.: 1/32)."""
    dead_window_tokens: int = Field(default=1_000_000, gt=0)
    """A feature is dead when it has not fired for this many tokens (AuxK, dead fraction,
    and the window of the feature densities in ``sparsity.safetensors``)."""
    seed: int = 0
    """Seeds the SAE's initialisation and the shuffle buffer."""


class ActivationsSection(_Section):
    """How activations are produced from the model and the data."""

    context_size: int = Field(default=128, gt=1)
    """Tokens per context; documents are packed and cut into contexts of this length."""
    model_batch_size: int = Field(default=16, gt=0)
    """Contexts per forward pass of the model."""
    shuffle_buffer_tokens: int = Field(default=65_536, gt=0)
    """Tokens (across many contexts) shuffled together before batching; rounded up to a
    multiple of ``train.batch_size``. Bigger mixes better; costs d_in × 4 bytes per token."""
    exclude_special_tokens: bool = True
    """Leave out positions holding special tokens (BOS, EOS, padding…)."""
    skip_first_positions: int = Field(default=1, ge=0)
    """Leave out the first positions of every context: the first token acts as an attention
    sink whose residual norm is ~100× the others' (SmolLM2 layer 15: ~24,000 vs ~190) and would
    dominate the reconstruction loss."""
    outlier_norm_factor: float | None = Field(default=10.0, gt=1)
    """Leave out rows whose norm exceeds this multiple of the median norm of their forward
    pass: attention-sink tokens past position 0 (after a leading newline, say) carry "massive
    activations" (Sun et al. 2024). In SmolLM2 layer 15 they are ~0.03% of tokens at ~130× the
    median norm, yet hold ~80% of the energy. None keeps every row."""
    epochs: int = Field(default=1, gt=0)
    """Passes over the data at most: a source smaller than ``train.total_tokens`` is read
    again from the start (the default corpus holds ~16M SmolLM2 tokens); the run ends early
    when the last pass ends."""
    cache_dir: Path | None = None
    """If set, activations are computed once into this directory (safetensors shards and a
    manifest, keyed by what determines them) and read back by later runs, e.g. a sweep."""
    device: str = "auto"
    """Where the model and the SAE run: ``auto`` (CUDA if present), ``cpu``, ``cuda:1``…"""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """The model's dtype; activations are handed to the SAE as float32 either way."""


class OutputSection(_Section):
    """Where and how often the run writes."""

    dir: Path = Path("runs/sae")
    """Output directory: ``checkpoints/step_XXXXXXXX/``, ``final/``, ``metrics.jsonl``, plots."""
    checkpoint_every_tokens: int | None = Field(default=10_000_000, gt=0)
    """Write a resumable checkpoint this often; a killed run loses at most this much
    (None: only the final checkpoint)."""
    keep_checkpoints: int = Field(default=2, gt=0)
    """How many of the latest periodic checkpoints to keep."""
    log_every_steps: int = Field(default=20, gt=0)
    """Steps per metrics record (a line in metrics.jsonl and the progress bar)."""
    progress: bool = True
    """Show a progress bar (only when stderr is a terminal)."""
    plots: bool = True
    """Write PNG plots of the metrics at the end."""


class TrainConfig(_Section):
    """A whole training run."""

    model: str = "default"
    """A Hugging Face causal LM id, a local model directory, or ``default`` (SmolLM2-135M)."""
    hookpoint: str | None = None
    """Block whose output (the residual stream after it) the SAE reads, e.g. ``model.layers.15``."""
    layer: int | None = None
    """Alternatively, the block's index; neither: the middle block."""
    data: DataConfig = Field(default_factory=DataConfig)
    """Text to train on."""
    sae: SAESection = Field(default_factory=SAESection)
    """The SAE's shape."""
    train: TrainSection = Field(default_factory=TrainSection)
    """Optimisation."""
    activations: ActivationsSection = Field(default_factory=ActivationsSection)
    """Activation generation."""
    output: OutputSection = Field(default_factory=OutputSection)
    """Outputs."""

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.hookpoint is not None and self.layer is not None:
            raise ValueError("layer: give hookpoint or layer, not both")
        if self.train.total_tokens < self.train.batch_size:
            raise ValueError("train.total_tokens: must be at least train.batch_size")
        if self.activations.skip_first_positions >= self.activations.context_size:
            raise ValueError("activations.skip_first_positions: must be below context_size")
        return self

    @property
    def total_steps(self) -> int:
        return self.train.total_tokens // self.train.batch_size

    @property
    def buffer_tokens(self) -> int:
        """The shuffle buffer rounded up to a whole number of batches."""
        b = self.train.batch_size
        return -(-self.activations.shuffle_buffer_tokens // b) * b


# ---- loading -------------------------------------------------------------------------------------
def load_config(
    path: Path | None = None,
    overrides: list[str] | None = None,
    *,
    base: dict[str, Any] | None = None,
) -> TrainConfig:
    """Validate a YAML file (or ``base``) with ``key.sub=value`` overrides applied on top."""
    raw = dict(base or {})
    if path is not None:
        raw = read_yaml(Path(path))
    for item in overrides or []:
        apply_override(raw, item)
    return validate(raw)


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as e:
        raise ConfigError(f"config: no such file {path}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"config: {path} is not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"config: {path} must hold a mapping at the top level")
    return raw


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set ``a.b.c=value`` in the nested dict ``raw``; the value is parsed as YAML (``1e-4``,
    ``true``, ``[0.9, 0.99]``, ``null``)."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r}: expected key.sub=value")
    parts = key.strip().split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[: i + 1])}: is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: cannot parse {text!r}: {e}") from e


def validate(raw: dict[str, Any]) -> TrainConfig:
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_errors(e)) from None


def format_errors(e: ValidationError) -> str:
    """One ``field.path: message`` per problem, joined by ``; ``."""
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        # Model validators name their field at the start of the message ("k: …").
        if m := re.fullmatch(r"([\w.]+): (.*)", msg, flags=re.S):
            loc, msg = (f"{loc}.{m[1]}" if loc else m[1]), m[2]
        lines.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(lines)
