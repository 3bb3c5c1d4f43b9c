"""Feature interventions and the forward hook that applies them, one row of a batch at a time.

The paper's method keeps the SAE's error term (Templeton et al. 2024, §"Feature steering"): with
``f = enc(x)`` and ``f'`` the edited features, the residual becomes::

    x' = x + dec(f') − dec(f) = x + Σ_j (f'_j − f_j) W_dec,j        (b_dec cancels)

so only the edited features' share of ``x`` changes, and clamping a feature to its current value
is an exact no-op. What each mode does is one table, ``EDITS`` (name → function of the feature's
value and the intervention's); where each scope applies is another, ``SCOPE_PHASES``: the
prompt's positions (the prefill), the ``generated`` positions (tokens the model generated, fed
back one per decode step), or both. Their keys are the words of the API's vocabularies
(``saescope.api.v1.vocabulary``; a test keeps them equal), and nothing depends on their order.

Batched decoding gives every row its own edits, so edits travel as padded tensors
(``EditBatch``): per row, its distinct features ``U`` and its edits ``M`` (each naming one of
those features). The hook encodes the rows that need it, gathers their features, edits them all
at once and adds the decoder-weighted deltas. It also records each row's features before and
after the edit — the trace. Vector edits (``direction``) add ``value · v`` to the residual
directly, with no feature read or traced.

An edit with a ``condition`` applies only at the positions where it holds: a feature's value,
or the residual's projection on a unit direction, above a threshold — both read from the
residual as it arrived, before any edit, so edits never trigger each other. Everywhere else the
residual is left bit-identical. The hook records where each conditional edit applied (the
response's ``fired``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from saescope.service.errors import InvalidArgument, OutOfRange
from saescope.service.runtime import LoadedSae
from saescope.service.types import Condition, Intervention, Limits
from saescope.training import models
from saescope.training.sae import SAE

EDITS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "clamp": lambda f, v: v.expand_as(f),  # f' = v
    "add": lambda f, v: f + v,  # f' = f + v
    "multiply": lambda f, v: f * v,  # f' = f · v
    "ablate": lambda f, v: torch.zeros_like(f),  # f' = 0
}
"""Mode → the edited value ``f'`` of features ``f`` given intervention values ``v``."""
SCOPE_PHASES: dict[str, frozenset[str]] = {
    "all": frozenset({"prompt", "generated"}),
    "prompt": frozenset({"prompt"}),
    "generated": frozenset({"generated"}),
}
"""Scope → the phases it applies in: ``prompt`` (prefill) and ``generated`` (decode steps)."""
VECTOR_MODES = ("direction",)
"""Modes that add ``value`` × a vector of their own to the residual stream, not a feature edit
(``x' = x + value · v``: a steering vector, e.g. a contrast search's difference in means)."""
MODES = (*EDITS, *VECTOR_MODES)
SCOPES = tuple(SCOPE_PHASES)
# Largest |value| of an intervention. Feature values are in model units, and residual norms of
# language models are O(1–1000): 1e4 is far past any useful steering, and keeps the edit finite
# in float16 (max 65504). Edits inside the bound can still blow a model up (NaN logits); the
# decode batcher fails that request alone (``generation``).
MAX_INTERVENTION_VALUE = 1e4


def validate_interventions(
    ls: LoadedSae, interventions: list[Intervention], limits: Limits
) -> None:
    """Count, features, modes, values, and no two edits of a feature with overlapping scopes."""
    if len(interventions) > limits.max_features:
        raise OutOfRange("interventions", len(interventions), limits.max_features, "interventions")
    seen: dict[int, list[tuple[int, str]]] = {}
    for i, iv in enumerate(interventions):
        where = f"interventions[{i}]"
        if iv.mode not in MODES:
            raise InvalidArgument(f"{where}.mode", f"must be one of {MODES}, got {iv.mode!r}")
        if iv.mode in VECTOR_MODES:
            _check_vector(ls, iv, where)
        elif iv.direction is not None:
            raise InvalidArgument(f"{where}.direction", f"only for mode direction, not {iv.mode}")
        else:
            ls.check_feature(iv.feature, f"{where}.feature")
        if iv.scope not in SCOPES:
            raise InvalidArgument(f"{where}.scope", f"must be one of {SCOPES}, got {iv.scope!r}")
        if not (math.isfinite(iv.value) and abs(iv.value) <= MAX_INTERVENTION_VALUE):
            raise InvalidArgument(
                f"{where}.value",
                f"must be finite with |value| ≤ {MAX_INTERVENTION_VALUE:g}, got {iv.value:g}",
            )
        if iv.condition is not None:
            _check_condition(ls, iv.condition, f"{where}.condition")
        if iv.mode in VECTOR_MODES:
            continue  # vectors add up; only feature edits can contradict each other
        for j, scope in seen.get(iv.feature, []):
            if SCOPE_PHASES[scope] & SCOPE_PHASES[iv.scope]:
                raise InvalidArgument(
                    where,
                    f"feature {iv.feature} is already edited by interventions[{j}] "
                    "with an overlapping scope",
                )
        seen.setdefault(iv.feature, []).append((i, iv.scope))


def _check_vector(ls: LoadedSae, iv: Intervention, where: str) -> None:
    """A vector mode's ``direction``: present, ``(d_in,)``, finite, entries within the bound."""
    if iv.direction is None:
        raise InvalidArgument(f"{where}.direction", f"required for mode {iv.mode}")
    _check_direction(ls, iv.direction, f"{where}.direction")


def _check_direction(ls: LoadedSae, v: np.ndarray, field: str) -> None:
    if v.shape != (ls.sae.cfg.d_in,):
        raise InvalidArgument(field, f"must have shape ({ls.sae.cfg.d_in},) (d_in), got {v.shape}")
    if not (np.isfinite(v).all() and np.abs(v).max(initial=0.0) <= MAX_INTERVENTION_VALUE):
        raise InvalidArgument(
            field, f"entries must be finite with |x| ≤ {MAX_INTERVENTION_VALUE:g}"
        )


def _check_condition(ls: LoadedSae, c: Condition, where: str) -> None:
    """Exactly one of a feature and a non-zero direction; a finite threshold within bound."""
    if (c.feature is None) == (c.direction is None):
        raise InvalidArgument(where, "give exactly one of feature and direction")
    if c.feature is not None:
        ls.check_feature(c.feature, f"{where}.feature")
    if c.direction is not None:
        _check_direction(ls, c.direction, f"{where}.direction")
        if not np.any(c.direction):
            raise InvalidArgument(f"{where}.direction", "must not be zero (it is normalised)")
    if not (math.isfinite(c.threshold) and abs(c.threshold) <= MAX_INTERVENTION_VALUE):
        raise InvalidArgument(
            f"{where}.threshold",
            f"must be finite with |threshold| ≤ {MAX_INTERVENTION_VALUE:g}, got {c.threshold:g}",
        )


def distinct_features(interventions: list[Intervention]) -> list[int]:
    """The edited features in order of first appearance (the trace's order)."""
    return list(dict.fromkeys(iv.feature for iv in interventions if iv.mode not in VECTOR_MODES))


@dataclass(frozen=True)
class RowEdits:
    """One row's edits, and the features it reads (edited ones first; traced ones too)."""

    features: list[int]
    edits: list[Intervention] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.features and not self.edits

    @property
    def conditional(self) -> list[int]:
        """Indices (in ``edits``: the request's order) of the edits with a condition."""
        return [j for j, iv in enumerate(self.edits) if iv.condition is not None]


# A condition's kind in ``EditBatch.cond_kind``.
_NONE, _FEATURE, _PROJECTION = 0, 1, 2


@dataclass
class EditBatch:
    """The edits of ``b`` rows of a forward's batch, padded to ``U`` features and ``M`` edits.

    A row's edit slots are its ``M`` feature edits, then its ``K`` vector edits: ``E = M + K``
    slots, each with a condition (kind ``_NONE`` for an unconditional edit or padding).
    """

    rows: Tensor  # (b,) row indices into the forward's batch
    feats: Tensor  # (b, U) feature ids (padding: 0)
    n_feats: list[int]  # real U per row
    target: Tensor  # (b, M) index into the row's feats (padding: 0)
    mode: Tensor  # (b, M) index into MODES
    value: Tensor  # (b, M)
    in_prompt: Tensor  # (b, M) the edit applies in the prefill (False for padding)
    in_generated: Tensor  # (b, M) the edit applies at decode steps (False for padding)
    vectors: Tensor  # (b, K, d_in) vector edits' vectors, times their value (padding: 0)
    vec_in_prompt: Tensor  # (b, K) the vector applies in the prefill
    vec_in_generated: Tensor  # (b, K) the vector applies at decode steps
    cond_kind: Tensor  # (b, E) _NONE, _FEATURE or _PROJECTION
    cond_feat: Tensor  # (b, E) the feature a _FEATURE condition reads (else 0)
    cond_dir: Tensor  # (b, E, d_in) a _PROJECTION condition's unit direction; d_in 0 if none
    cond_threshold: Tensor  # (b, E) float32
    conditional: list[list[tuple[int, int]]]  # per row: (slot, index in the request) pairs

    @property
    def has_conditions(self) -> bool:
        return any(self.conditional)

    @property
    def reads_features(self) -> bool:
        """Whether the hook must encode: features to edit or trace, or a feature condition."""
        return self.feats.shape[1] > 0 or bool((self.cond_kind == _FEATURE).any())

    @staticmethod
    def build(
        rows: list[tuple[int, RowEdits]], device: torch.device, dtype: torch.dtype
    ) -> EditBatch:
        b = len(rows)
        feature_edits = [[iv for iv in r.edits if iv.mode in EDITS] for _, r in rows]
        vector_edits = [[iv for iv in r.edits if iv.mode in VECTOR_MODES] for _, r in rows]
        u = max(len(r.features) for _, r in rows)
        m = max(map(len, feature_edits), default=0)
        k = max(map(len, vector_edits), default=0)
        d_in = next((iv.direction.shape[0] for ivs in vector_edits for iv in ivs), 0)  # type: ignore[union-attr]
        feats = torch.zeros((b, u), dtype=torch.long)
        target = torch.zeros((b, m), dtype=torch.long)
        mode = torch.zeros((b, m), dtype=torch.long)
        value = torch.zeros((b, m), dtype=torch.float32)
        phases = torch.zeros((2, b, m), dtype=torch.bool)  # [prompt, generated]
        vectors = torch.zeros((b, k, d_in), dtype=torch.float32)
        vec_phases = torch.zeros((2, b, k), dtype=torch.bool)
        conditions = _Conditions(b, m + k, rows)
        for i, (_, r) in enumerate(rows):
            feats[i, : len(r.features)] = torch.tensor(r.features, dtype=torch.long)
            slot = {f: k for k, f in enumerate(r.features)}
            for j, iv in enumerate(feature_edits[i]):
                target[i, j] = slot[iv.feature]
                mode[i, j] = MODES.index(iv.mode)
                value[i, j] = iv.value
                phases[:, i, j] = _phases(iv)
            for j, iv in enumerate(vector_edits[i]):
                vectors[i, j] = iv.value * torch.as_tensor(iv.direction, dtype=torch.float32)
                vec_phases[:, i, j] = _phases(iv)
            # Slots: the feature edits (0..M), then the vector edits (M..M+K), in request order.
            firsts = [j for j, iv in enumerate(r.edits) if iv.mode in EDITS]
            seconds = [j for j, iv in enumerate(r.edits) if iv.mode in VECTOR_MODES]
            for e, j in [*enumerate(firsts), *enumerate(seconds, start=m)]:
                conditions.set(i, e, j, r.edits[j])
        return EditBatch(
            rows=torch.tensor([i for i, _ in rows], dtype=torch.long, device=device),
            feats=feats.to(device),
            n_feats=[len(r.features) for _, r in rows],
            target=target.to(device),
            mode=mode.to(device),
            value=value.to(device=device, dtype=dtype),
            in_prompt=phases[0].to(device),
            in_generated=phases[1].to(device),
            vectors=vectors.to(device=device, dtype=dtype),
            vec_in_prompt=vec_phases[0].to(device),
            vec_in_generated=vec_phases[1].to(device),
            cond_kind=conditions.kind.to(device),
            cond_feat=conditions.feat.to(device),
            cond_dir=conditions.direction.to(device=device, dtype=dtype),
            cond_threshold=conditions.threshold.to(device),
            conditional=conditions.slots,
        )


class _Conditions:
    """``EditBatch``'s condition tensors while they are filled in, slot by slot."""

    def __init__(self, b: int, e: int, rows: list[tuple[int, RowEdits]]) -> None:
        conds = [iv.condition for _, r in rows for iv in r.edits if iv.condition is not None]
        d_in = next((c.direction.shape[0] for c in conds if c.direction is not None), 0)
        self.kind = torch.full((b, e), _NONE, dtype=torch.long)
        self.feat = torch.zeros((b, e), dtype=torch.long)
        self.direction = torch.zeros((b, e, d_in), dtype=torch.float32)
        self.threshold = torch.zeros((b, e), dtype=torch.float32)
        self.slots: list[list[tuple[int, int]]] = [[] for _ in range(b)]

    def set(self, row: int, slot: int, index: int, iv: Intervention) -> None:
        c = iv.condition
        if c is None:
            return
        self.slots[row].append((slot, index))
        self.threshold[row, slot] = c.threshold
        if c.feature is not None:
            self.kind[row, slot] = _FEATURE
            self.feat[row, slot] = c.feature
        else:
            v = torch.as_tensor(c.direction, dtype=torch.float64)
            self.kind[row, slot] = _PROJECTION
            self.direction[row, slot] = (v / v.norm()).float()


def _phases(iv: Intervention) -> Tensor:
    """``[applies in the prefill, applies at decode steps]`` for the edit's scope."""
    return torch.tensor([phase in SCOPE_PHASES[iv.scope] for phase in ("prompt", "generated")])


def apply_edits(
    sae: SAE, h: Tensor, eb: EditBatch, generated: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Edit residuals ``h`` (b, T, d_in) of the rows in ``eb``.

    ``generated`` says which phase the T positions are in: generated tokens (decode) or the
    prompt (prefill). Returns ``(h', f_before, f_after, applied)``: the middle two
    ``(b, T, U)``; ``applied`` ``(b, T, E)``, where each edit slot applied, when any edit has a
    condition (else ``None``).
    """
    b, t, d = h.shape
    u, m = eb.feats.shape[1], eb.target.shape[1]
    f = sae.encode(h.reshape(b * t, d)).view(b, t, -1) if eb.reads_features else None
    holds = _conditions(h, f, eb)  # (b, T, E), or None: every edit applies everywhere
    phase = torch.cat(
        [eb.in_generated, eb.vec_in_generated] if generated else [eb.in_prompt, eb.vec_in_prompt],
        dim=1,
    )  # (b, E)
    applied = None if holds is None else holds & phase[:, None, :]
    h_new = _add_vectors(h, eb, phase[:, m:], None if holds is None else holds[..., m:])
    if f is None or u == 0:  # vector edits only: no feature to edit or trace
        none = torch.zeros((b, t, 0), device=h.device)
        return h_new, none, none, applied
    f_u = f.gather(-1, eb.feats[:, None, :].expand(b, t, u))  # (b, T, U)
    if m == 0:
        return h_new, f_u, f_u, applied
    target = eb.target[:, None, :].expand(b, t, m)
    f_t = f_u.gather(-1, target)  # (b, T, M): each edit's feature before the edit
    v = eb.value[:, None, :]  # (b, 1, M)
    mode = eb.mode[:, None, :]
    new = f_t
    for index, edit in enumerate(EDITS.values()):  # MODES is this table's order
        new = torch.where(mode == index, edit(f_t, v), new)
    applies = phase[:, None, :m] if applied is None else applied[..., :m]  # (b, 1|T, M)
    if not bool(applies.any()):
        return h_new, f_u, f_u, applied  # no feature edit applies in this phase
    delta_m = torch.where(applies, new - f_t, 0.0)  # (b, T, M)
    # At most one edit per feature applies in a phase (validated), so scatter_add just places it.
    delta_u = torch.zeros_like(f_u).scatter_add_(-1, target, delta_m)  # (b, T, U)
    w_dec = sae.W_dec[eb.feats]  # (b, U, d_in)
    # The SAE computes in its own dtype (float32); the edit joins the residual in the model's.
    moved = torch.einsum("btu,bud->btd", delta_u, w_dec).to(h.dtype)
    if applied is None:
        h_new = h_new + moved
    else:  # positions where no conditional edit applied keep their residual, bit for bit
        h_new = torch.where(applies.any(-1, keepdim=True), h_new + moved, h_new)
    return h_new, f_u, f_u + delta_u, applied


def _conditions(h: Tensor, f: Tensor | None, eb: EditBatch) -> Tensor | None:
    """``(b, T, E)``: where each edit slot's condition holds (always, for no condition), read
    from the residual ``h`` and its features ``f`` before any edit; ``None`` when no edit of
    these rows has a condition."""
    if not eb.has_conditions:
        return None
    b, t, _ = h.shape
    kind = eb.cond_kind[:, None, :]  # (b, 1, E)
    value = torch.zeros((b, t, kind.shape[-1]), device=h.device)
    if f is not None:
        read = f.gather(-1, eb.cond_feat[:, None, :].expand(b, t, -1))
        value = torch.where(kind == _FEATURE, read.float(), value)
    if eb.cond_dir.shape[-1]:
        projection = torch.einsum("btd,bed->bte", h.to(eb.cond_dir.dtype), eb.cond_dir)
        value = torch.where(kind == _PROJECTION, projection.float(), value)
    return (kind == _NONE) | (value > eb.cond_threshold[:, None, :])


def _add_vectors(h: Tensor, eb: EditBatch, phase: Tensor, holds: Tensor | None) -> Tensor:
    """``h`` plus the rows' vector edits that apply in this phase (``phase``: (b, K)) and,
    with conditions, at this position (``holds``: (b, T, K)); ``h`` itself (the same object:
    bit-identical) when none does."""
    if not bool(phase.any()):
        return h
    if holds is None:
        add = (eb.vectors * phase[..., None]).sum(dim=1)  # (b, d_in): Σ_k value_k · v_k
        return h + add[:, None, :].to(h.dtype)
    mask = holds & phase[:, None, :]  # (b, T, K)
    add = torch.einsum("btk,bkd->btd", mask.to(eb.vectors.dtype), eb.vectors)
    return torch.where(mask.any(-1, keepdim=True), h + add.to(h.dtype), h)


@dataclass
class StepTrace:
    """What a steering hook saw in one forward: per hooked row, features before/after edits,
    and per position the conditional edits (their request indices) that applied."""

    rows: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)  # row → 2× (T, U_row)
    fired: dict[int, list[list[int]]] = field(default_factory=dict)  # row → per position


@contextmanager
def steering_hooks(
    model: nn.Module,
    groups: list[tuple[LoadedSae, EditBatch]],
    *,
    generated: bool,
    record: bool = True,
) -> Iterator[StepTrace]:
    """Install one forward hook per (SAE, rows) group on the SAE's hookpoint for a forward.

    The hook replaces the hooked rows' residual stream with their edited one, so every later
    block (and, through the KV cache, every later token) sees the edit. Where conditional
    edits applied is recorded always; the features' trace only with ``record``.
    """
    trace = StepTrace()
    handles = []
    for ls, eb in groups:

        def hook(_m: nn.Module, _i: Any, out: Any, ls: LoadedSae = ls, eb: EditBatch = eb) -> Any:
            h = models.hidden_of(out)  # (B, T, d_in)
            sub = h.index_select(0, eb.rows)  # (b, T, d_in)
            sub_new, before, after, applied = apply_edits(ls.sae, sub, eb, generated)
            rows = eb.rows.tolist()
            if record:
                before_c, after_c = before.float().cpu(), after.float().cpu()
                for i, row in enumerate(rows):
                    n = eb.n_feats[i]
                    trace.rows[row] = (before_c[i, :, :n], after_c[i, :, :n])
            if applied is not None:
                _record_fired(trace, rows, eb, applied.cpu())
            if sub_new is sub:
                return None  # keep the output object untouched
            return models.with_hidden(out, h.index_copy(0, eb.rows, sub_new))

        handles.append(model.get_submodule(ls.hookpoint).register_forward_hook(hook))
    try:
        yield trace
    finally:
        for handle in handles:
            handle.remove()


def _record_fired(trace: StepTrace, rows: list[int], eb: EditBatch, applied: Tensor) -> None:
    """Per row with conditional edits, per position, the request indices of those that applied."""
    for i, row in enumerate(rows):
        slots = eb.conditional[i]
        if not slots:
            continue
        hits = applied[i, :, [s for s, _ in slots]].tolist()  # (T, C)
        trace.fired[row] = [
            [j for (_, j), hit in zip(slots, at, strict=True) if hit] for at in hits
        ]
