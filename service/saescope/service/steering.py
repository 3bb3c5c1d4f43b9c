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
from saescope.service.types import Intervention, Limits
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
    v = iv.direction
    if v is None:
        raise InvalidArgument(f"{where}.direction", f"required for mode {iv.mode}")
    if v.shape != (ls.sae.cfg.d_in,):
        raise InvalidArgument(
            f"{where}.direction", f"must have shape ({ls.sae.cfg.d_in},) (d_in), got {v.shape}"
        )
    if not (np.isfinite(v).all() and np.abs(v).max(initial=0.0) <= MAX_INTERVENTION_VALUE):
        raise InvalidArgument(
            f"{where}.direction", f"entries must be finite with |x| ≤ {MAX_INTERVENTION_VALUE:g}"
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


@dataclass
class EditBatch:
    """The edits of ``b`` rows of a forward's batch, padded to ``U`` features and ``M`` edits."""

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
        )


def _phases(iv: Intervention) -> Tensor:
    """``[applies in the prefill, applies at decode steps]`` for the edit's scope."""
    return torch.tensor([phase in SCOPE_PHASES[iv.scope] for phase in ("prompt", "generated")])


def apply_edits(
    sae: SAE, h: Tensor, eb: EditBatch, generated: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Edit residuals ``h`` (b, T, d_in) of the rows in ``eb``.

    ``generated`` says which phase the T positions are in: generated tokens (decode) or the
    prompt (prefill). Returns ``(h', f_before, f_after)``, the latter two ``(b, T, U)``.
    """
    b, t, d = h.shape
    u, m = eb.feats.shape[1], eb.target.shape[1]
    h_new = _add_vectors(h, eb, generated)
    if u == 0:  # vector edits only: no feature to read
        none = torch.zeros((b, t, 0), device=h.device)
        return h_new, none, none
    f = sae.encode(h.reshape(b * t, d)).view(b, t, -1)  # (b, T, d_sae)
    f_u = f.gather(-1, eb.feats[:, None, :].expand(b, t, u))  # (b, T, U)
    if m == 0:
        return h_new, f_u, f_u
    target = eb.target[:, None, :].expand(b, t, m)
    f_t = f_u.gather(-1, target)  # (b, T, M): each edit's feature before the edit
    v = eb.value[:, None, :]  # (b, 1, M)
    mode = eb.mode[:, None, :]
    new = f_t
    for index, edit in enumerate(EDITS.values()):  # MODES is this table's order
        new = torch.where(mode == index, edit(f_t, v), new)
    applies = eb.in_generated if generated else eb.in_prompt  # (b, M)
    if not bool(applies.any()):
        return h_new, f_u, f_u  # no feature edit applies in this phase
    delta_m = torch.where(applies[:, None, :], new - f_t, 0.0)  # (b, T, M)
    # At most one edit per feature applies in a phase (validated), so scatter_add just places it.
    delta_u = torch.zeros_like(f_u).scatter_add_(-1, target, delta_m)  # (b, T, U)
    w_dec = sae.W_dec[eb.feats]  # (b, U, d_in)
    # The SAE computes in its own dtype (float32); the edit joins the residual in the model's.
    h_new = h_new + torch.einsum("btu,bud->btd", delta_u, w_dec).to(h.dtype)
    return h_new, f_u, f_u + delta_u


def _add_vectors(h: Tensor, eb: EditBatch, generated: bool) -> Tensor:
    """``h`` plus the rows' vector edits that apply in this phase; ``h`` itself (the same
    object: bit-identical) when none does."""
    applies = eb.vec_in_generated if generated else eb.vec_in_prompt  # (b, K)
    if not bool(applies.any()):
        return h
    add = (eb.vectors * applies[..., None]).sum(dim=1)  # (b, d_in): Σ_k value_k · v_k
    return h + add[:, None, :].to(h.dtype)


@dataclass
class StepTrace:
    """What a steering hook saw in one forward: per hooked row, features before/after edits."""

    rows: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)  # row → 2× (T, U_row)


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
    block (and, through the KV cache, every later token) sees the edit.
    """
    trace = StepTrace()
    handles = []
    for ls, eb in groups:

        def hook(_m: nn.Module, _i: Any, out: Any, ls: LoadedSae = ls, eb: EditBatch = eb) -> Any:
            h = models.hidden_of(out)  # (B, T, d_in)
            sub = h.index_select(0, eb.rows)  # (b, T, d_in)
            sub_new, before, after = apply_edits(ls.sae, sub, eb, generated)
            if record:
                before_c, after_c = before.float().cpu(), after.float().cpu()
                for i, row in enumerate(eb.rows.tolist()):
                    n = eb.n_feats[i]
                    trace.rows[row] = (before_c[i, :, :n], after_c[i, :, :n])
            if sub_new is sub:
                return None  # keep the output object untouched
            return models.with_hidden(out, h.index_copy(0, eb.rows, sub_new))

        handles.append(model.get_submodule(ls.hookpoint).register_forward_hook(hook))
    try:
        yield trace
    finally:
        for handle in handles:
            handle.remove()
