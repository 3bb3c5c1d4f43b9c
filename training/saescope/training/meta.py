"""What a checkpoint says about itself: ``saescope.json`` as one typed, validated record.

:class:`CheckpointMeta` holds each fact once: the model and hookpoint the SAE reads, its
config, how long it trained, its last metrics, and the rules its training data followed
(``context_size``, ``skip_first_positions``, ``outlier_norm_factor``, ``prepend_bos``), which
evals and the service apply again. ``config`` is the full training config, kept only so a run
can resume (and evals find the training data); nothing reads those facts out of it.

Reading validates every field and names the one that is wrong. It also reads the older files
written before this record existed: ``tokens`` for ``tokens_seen``, and the data rules only
inside ``config.activations``. Third-party SAEs (``foreign.load_foreign``) are described by the
same record, with their ``origin`` and ``feature_units``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeAlias, get_args

from saescope.training.sae import SAEConfig

FORMAT_VERSION = 1
META_FILE = "saescope.json"

Origin = Literal["saescope", "saelens", "sparsify"]
"""Which library wrote an SAE folder."""
FeatureUnits = Literal["decoder_norm", "library"]
"""Served features are ``f_i · ‖W_dec,i‖`` (unit decoder rows), or as the library computes them
(a TopK SAE whose decoder norms cannot be folded; ``foreign``'s docstring)."""

Check: TypeAlias = type[Any] | Callable[[object], bool]
"""A field's type, or a predicate on its value."""


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupt, or of an unknown format."""


@dataclass(frozen=True)
class CheckpointMeta:
    """The metadata of one SAE: what ``saescope.json`` holds, or what a foreign folder says."""

    model: str | None
    """The language model's id or path (``None``: a foreign SAE that does not record it)."""
    hookpoint: str
    """The module whose output the SAE reads, as the trainer or the folder names it."""
    sae: SAEConfig
    """The SAE's shape and architecture."""
    tokens_seen: int = 0
    """Training tokens the SAE saw."""
    steps: int = 0
    """Optimiser steps taken."""
    scale: float | None = None
    """The normalisation scale of training (already folded into the exported weights)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """The last training metrics record."""
    config: dict[str, Any] | None = None
    """The full training config: only for resuming and for evals' training data."""
    dataset: str | None = None
    """The training data source."""
    context_size: int | None = None
    """Tokens per training sequence."""
    skip_first_positions: int = 0
    """Leading positions of each sequence left out of training (the attention sink)."""
    outlier_norm_factor: float | None = None
    """Residual-norm outliers above this × the median were left out of training."""
    prepend_bos: bool = False
    """Whether training sequences began with a BOS token."""
    origin: Origin = "saescope"
    """Which library wrote the SAE."""
    feature_units: FeatureUnits = "decoder_norm"
    """What a served feature value means (:data:`FeatureUnits`)."""
    eval: dict[str, Any] | None = None
    """A held-out evaluation recorded with the SAE (``default_sae.ship``: ``saescope eval``'s
    metrics, with its data and context)."""
    shipped: dict[str, Any] | None = None
    """How a shipped SAE was cut down from its run (``default_sae.ship``)."""
    files: dict[str, str] = field(default_factory=dict)
    """sha256 of every other file of the checkpoint, by relative path (filled in on saving)."""
    format_version: int = FORMAT_VERSION
    """The version of this format."""

    def to_json(self) -> dict[str, Any]:
        """The JSON object ``saescope.json`` holds."""
        return dataclasses.asdict(self)  # the SAEConfig as its dict, containers copied

    @classmethod
    def from_json(cls, obj: object, where: str | Path) -> CheckpointMeta:
        """The record in ``obj`` (a parsed ``saescope.json`` of checkpoint ``where``), checked
        field by field; a :class:`CheckpointError` names the field that is wrong."""
        prefix = f"checkpoint: {where}: {META_FILE}"
        if not isinstance(obj, dict):
            raise CheckpointError(f"{prefix}: expected a JSON object, got {type(obj).__name__}")
        version = obj.get("format_version")
        if version != FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint: {where} has format_version {version!r}; "
                f"this saescope reads {FORMAT_VERSION}"
            )
        r = _Reader(obj, prefix)
        config = r.get("config", dict, "an object", None)
        # older files keep the data rules only in the training config
        activations = (config or {}).get("activations")
        r.fallback = activations if isinstance(activations, dict) else {}
        tokens = "tokens_seen" if obj.get("tokens_seen") is not None else "tokens"
        return cls(
            model=r.get("model", str, "a string"),
            hookpoint=r.get("hookpoint", str, "a string"),
            sae=_sae_config(r.get("sae", dict, "an object"), prefix),
            tokens_seen=r.get(tokens, _is_int, "an int", 0),
            steps=r.get("steps", _is_int, "an int", 0),
            scale=r.number("scale", None),
            metrics=r.mapping("metrics", _is_number, "a number"),
            config=config,
            dataset=r.get("dataset", str, "a string", None),
            context_size=r.get("context_size", _is_int, "an int", None, fallback=True),
            skip_first_positions=r.get("skip_first_positions", _is_int, "an int", 0, fallback=True),
            outlier_norm_factor=r.number("outlier_norm_factor", None, fallback=True),
            prepend_bos=r.get("prepend_bos", bool, "a bool", False, fallback=True),
            origin=r.choice("origin", get_args(Origin), "saescope"),
            feature_units=r.choice("feature_units", get_args(FeatureUnits), "decoder_norm"),
            eval=r.get("eval", dict, "an object", None),
            shipped=r.get("shipped", dict, "an object", None),
            files=r.mapping("files", str, "a string"),
        )


# ---- reading, field by field ---------------------------------------------------------------------
_MISSING: Any = object()


class _Reader:
    """Typed fields of one JSON object; errors read ``<prefix> <field>: expected …, got …``."""

    def __init__(self, obj: dict[str, Any], prefix: str) -> None:
        self.obj, self.prefix = obj, prefix
        self.fallback: dict[str, Any] = {}

    def get(
        self,
        name: str,
        check: Check,
        what: str,
        default: Any = _MISSING,
        *,
        fallback: bool = False,
    ) -> Any:
        """``obj[name]``; else (``fallback``) ``config.activations.<name>``; else ``default``
        (``None`` counts as absent where a default is given)."""
        where, value = name, self.obj.get(name)
        if value is None and fallback and self.fallback.get(name) is not None:
            where, value = f"config.activations.{name}", self.fallback[name]
        if value is None:
            if default is _MISSING:
                raise CheckpointError(f"{self.prefix} {name}: missing")
            return default
        if not _passes(value, check):
            raise CheckpointError(f"{self.prefix} {where}: expected {what}, got {value!r}")
        return value

    def number(self, name: str, default: float | None, *, fallback: bool = False) -> float | None:
        value = self.get(name, _is_number, "a number", default, fallback=fallback)
        return None if value is None else float(value)

    def mapping(self, name: str, check: Check, what: str) -> Any:
        """An object of ``check``-ed values (absent: empty)."""
        found = self.get(name, dict, "an object", {})
        for key, value in found.items():
            if not _passes(value, check):
                raise CheckpointError(
                    f"{self.prefix} {name}[{key!r}]: expected {what}, got {value!r}"
                )
        return dict(found)

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> Any:
        value = self.get(name, str, "a string", default)
        if value not in choices:
            raise CheckpointError(
                f"{self.prefix} {name}: expected one of {', '.join(choices)}, got {value!r}"
            )
        return value


def _passes(value: object, check: Check) -> bool:
    return isinstance(value, check) if isinstance(check, type) else check(value)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _sae_config(d: dict[str, Any], prefix: str) -> SAEConfig:
    try:
        return SAEConfig(**d)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{prefix} sae: {e}") from e
