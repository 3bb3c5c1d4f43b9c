"""Attribution, checked by ablation: does ablating a feature move log p(target) by about its
attribution?

AttributeFeatures (``saescope.service.attribution``) is a first-order estimate: a feature's
attribution is the change of log p(target) per unit of its share of the residual stream. So
removing the feature should move log p(target) by about −attribution. This measures how well.

For each prompt (by default the held-out sentences of every concept in ``concepts``, which
nothing here was tuned on): the attribution of the model's own next token, its ``top``
features by |attribution|, then real forwards with each of them ablated alone and with all of
them ablated together. Ablating keeps the error term, as steering does: ``x' = x − f_i w_i``
at the positions the SAE reads (exactly the part the attribution scored), nothing elsewhere.
Reported, for the single ablations and for the joint ones: the Pearson and Spearman
correlations between the predicted change (−attribution, summed for the joint ablation) and
the actual one, and the least-squares slope of actual on predicted (1 if first order were
exact; below 1 when the effect saturates).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats

from saescope.service import types as t
from saescope.service.engine import Engine
from saescope.service.runtime import LoadedSae
from saescope.service.steer_eval.concepts import CONCEPTS
from saescope.service.steer_eval.run import owned_engine
from saescope.training import models


def heldout_prompts() -> list[str]:
    """Every concept's held-out sentences with the concept, in concept order, each once."""
    return list(dict.fromkeys(s for c in CONCEPTS for s in c.heldout_positive))


@dataclass(frozen=True)
class CheckConfig:
    """What to check, and on how much."""

    sae: Path | None = None
    """The SAE checkpoint; or an engine's (``check(..., engine=)``)."""
    sae_id: str = ""
    """With an engine given: which of its SAEs (default: its default SAE)."""
    model: str = "default"
    prompts: int = 0
    """How many of ``heldout_prompts()`` (0: all)."""
    top: int = 5
    """Features per prompt, largest |attribution| first."""
    device: str = "cpu"


@dataclass(frozen=True)
class Ablation:
    """One ablation of one prompt: which features, the predicted and the actual change."""

    prompt: int
    features: tuple[int, ...]
    predicted: float  # −(their attribution), summed
    actual: float  # log p(target) ablated − log p(target)


@dataclass(frozen=True)
class Agreement:
    """How well predicted changes match actual ones over ``n`` ablations."""

    n: int
    pearson: float
    spearman: float
    slope: float  # least squares, actual on predicted (with an intercept)
    mean_abs_actual: float

    @staticmethod
    def of(ablations: list[Ablation]) -> Agreement:
        pred = np.array([a.predicted for a in ablations], dtype=np.float64)
        real = np.array([a.actual for a in ablations], dtype=np.float64)
        if len(pred) < 3 or pred.std() == 0 or real.std() == 0:
            nan = float("nan")
            size = float(np.abs(real).mean()) if len(real) else 0.0
            return Agreement(len(pred), nan, nan, nan, size)
        return Agreement(
            n=len(pred),
            pearson=float(np.corrcoef(pred, real)[0, 1]),
            spearman=float(stats.spearmanr(pred, real).statistic),
            slope=float(np.polyfit(pred, real, 1)[0]),
            mean_abs_actual=float(np.abs(real).mean()),
        )


@dataclass
class CheckResult:
    """Every ablation, and the agreement of single and joint ones."""

    prompts: int
    top: int
    single: Agreement
    joint: Agreement
    ablations: list[Ablation] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check(cfg: CheckConfig, *, engine: Engine | None = None, log: Any = print) -> CheckResult:
    """Run the check (see the module docstring) on ``engine``, or on one it builds."""
    start = time.perf_counter()
    texts = heldout_prompts()
    if not 0 <= cfg.prompts <= len(texts):
        raise ValueError(f"prompts: must be in [0, {len(texts)}] (0: all), got {cfg.prompts}")
    if cfg.top < 1:
        raise ValueError(f"top: must be ≥ 1, got {cfg.top}")
    if engine is None:
        with owned_engine(cfg.sae, cfg.model, cfg.device) as own:
            return check(cfg, engine=own, log=log)
    ls = engine.rt.get_sae(cfg.sae_id)
    texts = texts[: cfg.prompts or None]
    ablations: list[Ablation] = []
    for n, text in enumerate(texts):
        req = t.AttributeRequest(prompt=t.Prompt(text=text), sae_id=ls.sae_id, top_n=cfg.top)
        res = engine.attribute(req)
        sets: list[tuple[int, ...]] = [(f.feature,) for f in res.features]
        if len(sets) > 1:
            sets.append(tuple(f.feature for f in res.features))
        ids = [tok.id for tok in res.prompt_tokens]
        actual = ablated_logprobs(engine, ls, ids, res.read, sets, res.target.id)
        by_feature = {f.feature: f.attribution for f in res.features}
        ablations += [
            Ablation(n, s, -sum(by_feature[i] for i in s), a)
            for s, a in zip(sets, actual, strict=True)
        ]
        if (n + 1) % 16 == 0:
            log(f"attribution check: {n + 1}/{len(texts)} prompts")
    single = [a for a in ablations if len(a.features) == 1]
    joint = [a for a in ablations if len(a.features) > 1]
    return CheckResult(
        prompts=len(texts),
        top=cfg.top,
        single=Agreement.of(single),
        joint=Agreement.of(joint),
        ablations=ablations,
        seconds=time.perf_counter() - start,
    )


@torch.inference_mode()
def ablated_logprobs(
    engine: Engine,
    ls: LoadedSae,
    ids: list[int],
    read: list[bool],
    sets: list[tuple[int, ...]],
    target: int,
) -> list[float]:
    """Per set of features, the change of log p(target | ids) when they are ablated at the
    positions ``read``, error term kept (``x' = x − Σ_i f_i w_i``): one batched forward, whose
    first row ablates nothing and is the reference."""
    rt = engine.rt
    rows = len(sets) + 1
    mask = torch.zeros((rows, ls.d_sae), device=rt.device)  # (R, d_sae): row 0 ablates nothing
    for r, features in enumerate(sets, start=1):
        mask[r, list(features)] = 1.0
    where = torch.tensor(read, dtype=torch.float32, device=rt.device)[None, :, None]  # (1, T, 1)

    def ablate(_m: Any, _i: Any, out: Any) -> Any:
        h = models.hidden_of(out)  # (R, T, d_in): every row the same prompt, unedited here
        f = ls.sae.encode(h[0])  # (T, d_sae)
        removed = (f[None] * mask[:, None, :]) @ ls.sae.W_dec  # (R, T, d_in)
        return models.with_hidden(out, h - (removed * where).to(h.dtype))

    input_ids = torch.tensor([ids] * rows, dtype=torch.long, device=rt.device)
    with rt.lock:
        handle = rt.model.get_submodule(ls.hookpoint).register_forward_hook(ablate)
        try:
            logits = rt.model(input_ids=input_ids, use_cache=False, logits_to_keep=1).logits
        finally:
            handle.remove()
    logp = torch.log_softmax(logits[:, -1].float(), dim=-1)[:, target]  # (R,)
    return (logp[1:] - logp[0]).tolist()


def markdown(result: CheckResult) -> str:
    """The table and a sentence, for STEERING.md."""
    rows = [("each feature alone", result.single), (f"top {result.top} together", result.joint)]
    lines = [
        "| ablation | n | Pearson r | Spearman ρ | slope | mean abs. actual change |",
        "|---|---|---|---|---|---|",
    ]
    for name, a in rows:
        lines.append(
            f"| {name} | {a.n} | {a.pearson:.3f} | {a.spearman:.3f} | {a.slope:.3f} | "
            f"{a.mean_abs_actual:.3f} nats |"
        )
    return "\n".join(lines)
