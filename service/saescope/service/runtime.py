"""What the engine holds: the language model, its tokenizer, the loaded SAEs, and the lock that
serialises forward passes.

Every model forward (activations, contrast, each decode step of the batcher) takes ``lock``, a
FIFO lock: the decode thread re-acquires it every step, and a plain ``threading.Lock`` would let
it starve a waiting activations call. Batching, not concurrency, is how work shares the device.

``observer`` (an ``EngineObserver``) hears what the engine did, for metrics: each SAE encode and
its time, each decode step's rows and time, each generation's wait before it joined the decode
batch. The engine calls it from the threads that do the work — the decode thread and the app's
worker threads, concurrently — so an observer must be thread-safe, fast, and must not raise. The
default, ``NoObserver``, ignores everything, and then nothing is timed.

Timing an encode needs its kernels to have finished. On CPU they have when ``encode`` returns,
so encodes are timed there for free. On an accelerator, kernels run asynchronously: an encode is
timed only with ``sync_timing`` (the engine's ``metrics_sync_timing``), which synchronises the
device before and after each encode — exact, but it stalls the CPU's run-ahead each time, so it
is off by default and ``on_sae_encode`` is then never called on GPU.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol, cast

import torch
from torch import Tensor

from saescope.service import catalog as catalogs
from saescope.service.errors import InvalidArgument, NotFound
from saescope.service.sae_pool import SaePool
from saescope.service.types import SaeInfo
from saescope.training import checkpoint, foreign, models, positions
from saescope.training.meta import CheckpointMeta
from saescope.training.paths import sha256_file
from saescope.training.sae import SAE

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


class FairLock:
    """A non-reentrant lock granted in arrival order (ticket lock)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next = 0
        self._serving = 0

    def __enter__(self) -> FairLock:
        with self._cond:
            ticket = self._next
            self._next += 1
            self._cond.wait_for(lambda: self._serving == ticket)
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._serving += 1
            self._cond.notify_all()


class EngineObserver(Protocol):
    """What the engine reports as it works (see the module docstring: thread-safe, never raise)."""

    def on_sae_encode(self, sae_id: str, seconds: float) -> None:
        """An SAE encoded one batch of residuals (a forward pass's prompt, a decode step's rows)."""

    def on_decode_step(self, rows: int, seconds: float) -> None:
        """One decode step advanced ``rows`` rows; ``seconds`` from its start to its tokens."""

    def on_admit(self, wait_seconds: float) -> None:
        """A generation joined the decode batch ``wait_seconds`` after it was submitted."""


class NoObserver:
    """The default observer: ignores everything (and so nothing is timed)."""

    def on_sae_encode(self, sae_id: str, seconds: float) -> None:
        pass

    def on_decode_step(self, rows: int, seconds: float) -> None:
        pass

    def on_admit(self, wait_seconds: float) -> None:
        pass


@dataclass
class LoadedSae:
    """An SAE ready to serve: on the model's device, in float32 (see ``load_saes``), with its
    metadata."""

    sae_id: str
    sae: SAE
    hookpoint: str
    layer: int
    meta: CheckpointMeta
    log_density: Tensor | None  # (d_sae,) log10 feature density from training, on CPU
    catalog: catalogs.ServedCatalog | None = None  # from ``<path>/catalog/`` when present
    _unit_dec: Tensor | None = field(default=None, repr=False)

    @property
    def d_sae(self) -> int:
        return self.sae.cfg.d_sae

    def unit_decoder(self) -> Tensor:
        """Unit-norm decoder rows ``(d_sae, d_in)`` (export makes them unit already; be safe)."""
        if self._unit_dec is None:
            w = self.sae.W_dec.float()
            self._unit_dec = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return self._unit_dec

    def aggregation_mask(self, x: Tensor, special: list[bool], include_special: bool) -> Tensor:
        """Positions ``(T,)`` that count when a prompt's features are aggregated over tokens.

        Left out unless ``include_special``: special tokens, and the positions the SAE never saw
        in training (``out_of_distribution``). Such positions carry huge, meaningless feature
        values that would top every aggregate and every contrast.
        """
        if include_special:
            return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)  # (T,)
        keep = ~self.out_of_distribution(x, special)  # (T,)
        return keep & ~torch.tensor(special, dtype=torch.bool, device=x.device)

    def out_of_distribution(self, x: Tensor, special: list[bool]) -> Tensor:
        """Positions ``(T,)`` of residuals ``x (T, d_in)`` the SAE never saw in training.

        The trainer's rule, as its checkpoint records it (``saescope.training.positions``): the
        first ``skip_first_positions`` of a prompt, where the attention sink sits (its residual
        norm is ~100× the median on SmolLM2), and any position whose residual norm exceeds
        ``outlier_norm_factor`` × the median over the prompt's eligible positions (not special,
        past the first).
        """
        flags = torch.tensor(special, dtype=torch.bool, device=x.device)
        return positions.out_of_distribution(x, flags, positions.rules_of(self.meta))

    def info(self) -> SaeInfo:
        cfg = self.sae.cfg
        # A shipped SAE carries its held-out evaluation (less the settings recorded with it);
        # else the training's last log window.
        metrics = (
            {k: v for k, v in self.meta.eval.items() if k not in EVAL_SETTINGS}
            if self.meta.eval
            else self.meta.metrics
        )
        return SaeInfo(
            sae_id=self.sae_id,
            hookpoint=self.hookpoint,
            layer=self.layer,
            d_in=cfg.d_in,
            d_sae=cfg.d_sae,
            architecture=cfg.architecture,
            k=cfg.k or 0,
            metrics={
                str(k): float(v)
                for k, v in metrics.items()
                if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            },
            tokens_seen=self.meta.tokens_seen,
            has_catalog=self.catalog is not None,
            origin=self.meta.origin,
        )

    def check_feature(self, feature: int, field: str) -> None:
        """InvalidArgument for a negative feature, NotFound for one past ``d_sae``."""
        if feature < 0:
            raise InvalidArgument(field, f"feature {feature} is negative")
        if feature >= self.d_sae:
            raise NotFound(
                f"{field}: feature {feature} does not exist in SAE {self.sae_id!r} "
                f"(d_sae = {self.d_sae})"
            )


EVAL_SETTINGS = frozenset({"context_size", "skip_first_positions", "outlier_norm_factor", "data"})
"""Keys of a recorded evaluation that say how it was run, not what it measured."""


@dataclass
class ModelRuntime:
    """The model, its tokenizer and SAEs, and facts about them the engine's modules share."""

    model: Any  # a transformers causal LM, eval mode, no grad
    tokenizer: Any  # a fast tokenizer
    model_name: str
    device: torch.device
    dtype: torch.dtype
    default_sae_id: str
    saes: SaePool = field(default_factory=SaePool.empty)
    lock: FairLock = field(default_factory=FairLock)
    observer: EngineObserver = field(default_factory=NoObserver)
    sync_timing: bool = False  # time encodes on an accelerator too, with a sync around each
    _token_text: dict[int, str] = field(default_factory=dict, repr=False)

    @cached_property
    def special_ids(self) -> frozenset[int]:
        return frozenset(int(i) for i in self.tokenizer.all_special_ids)

    @cached_property
    def eos_ids(self) -> frozenset[int]:
        """End-of-sequence ids: the generation config's (one or a list) and the tokenizer's."""
        ids: set[int] = set()
        gen_cfg = getattr(self.model, "generation_config", None)
        eos = getattr(gen_cfg, "eos_token_id", None)
        ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return frozenset(ids)

    @property
    def max_positions(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 1 << 30) or 1 << 30)

    def token_text(self, token_id: int) -> str:
        """A token decoded on its own (memoised: the same ids recur in every response)."""
        text = self._token_text.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id])
            self._token_text[token_id] = text
        return text

    @property
    def times_encodes(self) -> bool:
        """Whether ``encode`` is timed: someone listens, and the time is true (CPU, or sync)."""
        return not isinstance(self.observer, NoObserver) and (
            self.device.type == "cpu" or self.sync_timing
        )

    def encode(self, ls: LoadedSae, x: Tensor) -> Tensor:
        """``ls.sae.encode(x)``, its time reported to the observer when ``times_encodes``."""
        if not self.times_encodes:
            return ls.sae.encode(x)
        self._synchronize()
        start = time.perf_counter()
        f = ls.sae.encode(x)
        self._synchronize()
        self.observer.on_sae_encode(ls.sae_id, time.perf_counter() - start)
        return f

    def timed(self, ls: LoadedSae) -> LoadedSae:
        """``ls`` whose ``sae.encode`` goes through ``encode`` (for code handed an SAE, such as
        the steering hook); ``ls`` itself when encodes are not timed. A shallow copy per use:
        cheap, and safe from any thread (the SAE's weights are only read)."""
        if not self.times_encodes:
            return ls
        return dataclasses.replace(ls, sae=cast(SAE, _TimedSae(self, ls)))

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def get_sae(self, sae_id: str) -> LoadedSae:
        """The SAE named ``sae_id`` (empty: the default), or NotFound."""
        key = sae_id or self.default_sae_id
        if key not in self.saes:
            known = ", ".join(sorted(self.saes)) or "none"
            shown = key if len(key) <= 64 else key[:64] + "…"
            raise NotFound(f"sae_id: no SAE {shown!r} is loaded (loaded: {known})")
        return self.saes[key]


class _TimedSae:
    """An SAE whose ``encode`` is timed by ``ModelRuntime.encode``; all else is the SAE's own."""

    def __init__(self, rt: ModelRuntime, ls: LoadedSae) -> None:
        self._rt, self._ls = rt, ls

    def encode(self, x: Tensor) -> Tensor:
        return self._rt.encode(self._ls, x)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ls.sae, name)


def load_saes(
    model: Any,
    paths: dict[str, str | Path],
    *,
    device: torch.device,
    model_name: str | None = None,
    token_text: Callable[[int], str] | None = None,
) -> dict[str, LoadedSae]:
    """Load every SAE, checking it fits the model; errors name the sae_id.

    An SAE's feature catalog (``<path>/catalog/``) loads with it, checked against the SAE's
    weights (``catalog.load``): a corrupt one, or one of another SAE, is an error too.
    ``token_text`` decodes a token id for the catalog's search index (default ``str``: the id
    itself, for callers without a tokenizer).

    A folder is a saescope checkpoint (``saescope.json``: hash-checked, its metadata names the
    hookpoint) or a SAELens or sparsify folder served as it is (``saescope.training.foreign``:
    its hook name is mapped to the model's block; a recorded model id that does not look like
    ``model_name`` is warned about, not refused — the same model has many names).

    SAEs stay in float32 whatever the model's dtype. Cast to bfloat16, the default SAE's
    features differ from float32's by 0.27% of their norm (median; p99 0.5%) and 0.2% of the
    active features flip, and on a CPU its encode is ~100× slower (``bench/sae_dtype.py``,
    BENCHMARKS.md). The encoder casts a low-precision residual up; steering casts its edit
    back down to the residual's dtype.
    """
    d_model = int(model.config.hidden_size)
    out: dict[str, LoadedSae] = {}
    for sae_id, path in paths.items():
        if not sae_id:
            raise ValueError("saes: an sae_id must not be empty")
        try:
            sae, meta, hookpoint = _load_one(model, Path(path), device, model_name)
        except ValueError as e:  # CheckpointError, ForeignSaeError, a hookpoint's ValueError
            raise ValueError(f"saes[{sae_id!r}]: {e}") from e
        if sae.cfg.d_in != d_model:
            raise ValueError(
                f"saes[{sae_id!r}]: d_in = {sae.cfg.d_in} does not match the model's "
                f"hidden size {d_model}"
            )
        try:
            served = catalogs.load(Path(path), _weights_sha256(Path(path), meta), token_text or str)
        except ValueError as e:  # CatalogError, and an index past the catalog's d_sae
            raise ValueError(f"saes[{sae_id!r}]: {e}") from e
        if served is not None and served.catalog.d_sae != sae.cfg.d_sae:
            raise ValueError(
                f"saes[{sae_id!r}]: its catalog has d_sae = {served.catalog.d_sae}, the SAE "
                f"{sae.cfg.d_sae}"
            )
        out[sae_id] = LoadedSae(
            sae_id=sae_id,
            sae=sae,
            hookpoint=hookpoint,
            layer=models.layer_index(model, hookpoint),
            meta=meta,
            log_density=_load_log_density(Path(path), sae.cfg.d_sae),
            catalog=served,
        )
    return out


def _weights_sha256(path: Path, meta: CheckpointMeta) -> str | None:
    """The sha256 of the SAE's weights file, which its catalog records (None: no such file)."""
    recorded = meta.files.get(checkpoint.WEIGHTS_FILE)
    if recorded:
        return recorded
    weights = path / checkpoint.WEIGHTS_FILE
    return sha256_file(weights) if weights.is_file() else None


def _load_one(
    model: Any, path: Path, device: torch.device, model_name: str | None
) -> tuple[SAE, CheckpointMeta, str]:
    """One SAE folder of any origin: the SAE, its metadata (with ``origin``), its hookpoint."""
    if foreign.origin_of(path) in ("saelens", "sparsify"):
        sae, meta = foreign.load_foreign(path, device=device)
        hookpoint = foreign.map_hookpoint(model, meta.hookpoint)
        if model_name is not None and not foreign.same_model(meta.model, model_name):
            log.warning(
                "%s: cfg.json names model %r, but %r is served; its features may mean nothing",
                path,
                meta.model,
                model_name,
            )
        return sae, meta, hookpoint
    sae, meta = checkpoint.load_sae(path, device=device, dtype=torch.float32)
    return sae, meta, models.resolve_hookpoint(model, meta.hookpoint)


def _load_log_density(path: Path, d_sae: int) -> Tensor | None:
    """``sparsity.safetensors`` (log10 densities, SAELens's convention) when present and sane."""
    f = path / checkpoint.SPARSITY_FILE
    if not f.is_file():
        return None
    from safetensors.torch import load_file

    sparsity = load_file(str(f)).get("sparsity")
    if sparsity is None or tuple(sparsity.shape) != (d_sae,):
        return None
    return sparsity.float().cpu()
