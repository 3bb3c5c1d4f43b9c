"""The steering evaluation: every concept × method × strength on the same prompts, judged.

For each concept (``concepts``), on its *find* sentences: a contrast search (the SAE's top
hits) and the difference-in-means vector. Then the same chat prompts (``GENERATION_PROMPTS``),
greedy, the same token budget, under each method and strength:

- ``none``: the model as it is; ``prompt``: the concept's instruction as a system prompt;
- ``diffmean``: the difference-in-means vector added at the SAE's hookpoint, × strength
  (AxBench's strongest vector method; Wu et al. 2025);
- ``sae_add`` / ``sae_clamp``: the top contrast hit added / clamped, error term kept (the
  paper's method);
- ``sae_clamp_top5``: the top five hits clamped together;
- ``sae_clamp_specific``: the top hit of a second contrast, against the concept's *siblings*
  (the other concepts of its judge kind: French against German, Spanish and Italian; the sea
  against food), clamped. Against neutral English, the four languages share their top hits
  ("not English" features); against each other, the hits are the language's own.
- ``sae_output``: the hit with the highest output score among the 20 of largest effect size
  (``order_by="output_score"``: a feature that moves the output, not one that only reads the
  input; Arad et al. 2025), clamped.

A strength is an edit norm in units of the difference-in-means vector's norm, the same for every
method (a feature's decoder direction has unit norm: clamped to s·‖v‖, it moves the residual as
far as the vector × s does, less its current value), so methods compare at equal force.

Each continuation is judged (``judges``: never the SAE, never the model), and its fluency
measured: the perplexity of the continuation on its own under the unsteered model (an English
prompt makes any French continuation unlikely by design, so it is not conditioned on the
prompt), relative to natural text — the higher perplexity of the concept's held-out sentences
and of held-out neutral English, since a fluent continuation may be either (code is far more
predictable than prose: against code alone, every English reply would look broken) — and the
rate of repeated token 3-grams. All steering runs in process on the engine (``Engine``): what the
service would do, without Ray in the measurement.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from saescope.service import types as t
from saescope.service.engine import Engine
from saescope.service.steer_eval import judges
from saescope.service.steer_eval.concepts import (
    CONCEPTS,
    FIND,
    GENERATION_PROMPTS,
    NEUTRAL_ENGLISH,
    Concept,
)

METHODS = (
    "none",
    "prompt",
    "diffmean",
    "sae_add",
    "sae_clamp",
    "sae_clamp_top5",
    "sae_clamp_specific",
    "sae_output",
)
FLUENCY_BUDGET = 2.0  # relative perplexity a result may reach and still count


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate, and how much of it."""

    sae: Path | None = None
    """The SAE checkpoint (its hookpoint is where every method steers); or an engine's."""
    sae_id: str = ""
    """With an engine given: which of its SAEs (default: its default SAE)."""
    model: str = "default"
    concepts: tuple[str, ...] = ()
    """Concept names (empty: all)."""
    prompts: int = 16
    """How many of ``GENERATION_PROMPTS`` to continue."""
    max_new_tokens: int = 24
    strengths: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    """Edit norms, as multiples of the difference-in-means vector's norm (every method)."""
    device: str = "cpu"


@dataclass
class Run:
    """One concept × method × strength: its continuations and their scores."""

    concept: str
    method: str
    strength: float
    concept_score: float  # fraction judged to show the concept
    relative_ppl: float  # continuations' perplexity / the concept's natural text's
    repetition: float  # repeated token 3-grams, fraction
    examples: list[str] = field(default_factory=list)

    @property
    def fluency(self) -> float:
        """1 within the fluency budget, decaying beyond it."""
        return min(1.0, FLUENCY_BUDGET / self.relative_ppl) if self.relative_ppl > 0 else 0.0

    @property
    def aggregate(self) -> float:
        """Harmonic mean of concept score and fluency (AxBench's style of aggregate)."""
        a, b = self.concept_score, self.fluency
        return 0.0 if a <= 0 or b <= 0 else 2 * a * b / (a + b)


@dataclass
class Result:
    """The whole evaluation: its runs, each judge's accuracy, and what was found per concept."""

    runs: list[Run]
    judge_accuracy: dict[str, float]
    found: dict[str, dict[str, Any]]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "runs": [
                asdict(r) | {"fluency": r.fluency, "aggregate": r.aggregate} for r in self.runs
            ],
            "judge_accuracy": self.judge_accuracy,
            "found": self.found,
            "seconds": self.seconds,
        }


def evaluate(cfg: EvalConfig, *, engine: Engine | None = None, log: Any = print) -> Result:
    """Run the evaluation (see the module docstring)."""
    start = time.perf_counter()
    _validate(cfg)
    if engine is None:
        with owned_engine(cfg.sae, cfg.model, cfg.device) as own:
            return evaluate(cfg, engine=own, log=log)
    sae_id = cfg.sae_id or engine.rt.default_sae_id
    chosen = [c for c in CONCEPTS if not cfg.concepts or c.name in cfg.concepts]
    prompts = list(GENERATION_PROMPTS[: cfg.prompts])
    runs: list[Run] = []
    found: dict[str, dict[str, Any]] = {}
    accuracy = {c.name: judges.judge_accuracy(c) for c in chosen}
    neutral = _perplexity(engine, list(NEUTRAL_ENGLISH[FIND:]))
    for concept in chosen:
        hits, vector, norm = _find(engine, sae_id, concept, concept.find_negative)
        siblings = [  # a third of each sibling's find sentences
            sentence
            for other in CONCEPTS
            if other.judge == concept.judge and other is not concept
            for sentence in other.find_positive[: FIND // 3]
        ]
        specific = _find(engine, sae_id, concept, tuple(siblings))[0] if siblings else []
        output = _find(engine, sae_id, concept, concept.find_negative, "output_score")[0]
        found[concept.name] = {
            "top_hits": [(h.feature, round(h.auroc, 3), round(h.mean_positive, 3)) for h in hits],
            "top_hits_against_siblings": [(h.feature, round(h.auroc, 3)) for h in specific],
            "top_hits_by_output_score": [
                (h.feature, round(h.auroc, 3), round(h.output_score or 0.0, 4)) for h in output
            ],
            "difference_in_means_norm": norm,
        }
        reference = max(_perplexity(engine, list(concept.heldout_positive)), neutral)
        chosen_hits = _Hits(hits, specific, output)
        for method, strength, edits, system in _configs(cfg, concept, chosen_hits, vector):
            texts = _generate(engine, sae_id, prompts, edits, system, cfg.max_new_tokens)
            judge = judges.judge_for(concept)
            run = Run(
                concept=concept.name,
                method=method,
                strength=strength,
                concept_score=sum(judges.shows(judge, x) for x in texts) / len(texts),
                relative_ppl=_perplexity(engine, texts) / reference,
                repetition=float(np.mean([_repetition(engine, x) for x in texts])),
                examples=texts[:3],
            )
            runs.append(run)
            log(
                f"{concept.name:20s} {method:15s} ×{strength:<4g} concept {run.concept_score:.2f}"
                f" · rel. ppl {run.relative_ppl:.2f} · repetition {run.repetition:.2f}"
            )
    return Result(runs, accuracy, found, time.perf_counter() - start)


@contextmanager
def owned_engine(sae: Path | None, model: str, device: str) -> Iterator[Engine]:
    """An engine on ``model`` serving the checkpoint ``sae``, closed on leaving (for the
    evaluations' runs that are given no engine)."""
    if sae is None:
        raise ValueError("sae: an SAE checkpoint is required")
    own = Engine(model, {"eval": sae}, device=device)
    try:
        yield own
    finally:
        own.close()


def _validate(cfg: EvalConfig) -> None:
    names = [c.name for c in CONCEPTS]
    unknown = [c for c in cfg.concepts if c not in names]
    if unknown:
        raise ValueError(f"concepts: {unknown} are not among {names}")
    if not 1 <= cfg.prompts <= len(GENERATION_PROMPTS):
        raise ValueError(f"prompts: must be in [1, {len(GENERATION_PROMPTS)}], got {cfg.prompts}")
    if cfg.max_new_tokens < 1 or not cfg.strengths:
        raise ValueError("max_new_tokens and strengths: at least 1 token and one strength")


# ---- what steers -----------------------------------------------------------------------------
def _find(
    engine: Engine,
    sae_id: str,
    concept: Concept,
    negative: tuple[str, ...],
    order_by: t.OrderBy = "effect_size",
) -> tuple[list[Any], np.ndarray, float]:
    """The top 5 positive contrast hits of the concept's find sentences against ``negative``,
    and the difference-in-means vector."""
    res = engine.contrast(
        t.ContrastRequest(
            positive=[t.Prompt(text=s) for s in concept.find_positive],
            negative=[t.Prompt(text=s) for s in negative],
            sae_id=sae_id,
            top_n=5,
            order_by=order_by,
        )
    )
    vector = np.asarray(res.difference_in_means, dtype=np.float32)
    return list(res.positive_hits), vector, res.difference_in_means_norm


@dataclass(frozen=True)
class _Hits:
    """A concept's contrast hits: against neutral English by effect size (``top``), against its
    siblings (``specific``), and against neutral English by output score (``output``)."""

    top: list[Any]
    specific: list[Any]
    output: list[Any]


def _configs(
    cfg: EvalConfig, concept: Concept, found: _Hits, vector: np.ndarray
) -> Iterable[tuple[str, float, list[t.Intervention], str | None]]:
    """(method, strength, interventions, system prompt) for every run of one concept."""
    yield "none", 0.0, [], None
    yield "prompt", 0.0, [], concept.instruction
    # Strength s means an edit of norm s × ‖difference in means‖ for every method, so the
    # methods compare at equal force: the vector is scaled by s; a feature (unit decoder
    # direction) is added or clamped to s·‖v‖; five features share it (s·‖v‖/√5 each).
    norm = float(np.linalg.norm(vector))
    for s in cfg.strengths:
        yield "diffmean", s, [t.Intervention(0, "direction", s, direction=vector)], None
        hits = found.top
        if hits:
            top = hits[0].feature
            yield "sae_add", s, [t.Intervention(top, "add", s * norm)], None
            yield "sae_clamp", s, [t.Intervention(top, "clamp", s * norm)], None
            share = s * norm / math.sqrt(len(hits[:5]))
            five = [t.Intervention(h.feature, "clamp", share) for h in hits[:5]]
            yield "sae_clamp_top5", s, five, None
        if found.specific:
            own = t.Intervention(found.specific[0].feature, "clamp", s * norm)
            yield "sae_clamp_specific", s, [own], None
        if found.output:
            best = t.Intervention(found.output[0].feature, "clamp", s * norm)
            yield "sae_output", s, [best], None


def _generate(
    engine: Engine,
    sae_id: str,
    prompts: list[str],
    edits: list[t.Intervention],
    system: str | None,
    max_new_tokens: int,
) -> list[str]:
    """Greedy continuations of every prompt, submitted together (the decode batcher batches)."""
    handles = []
    for text in prompts:
        chat = (t.ChatMessage("system", system),) if system else ()
        prompt = t.Prompt(chat=(*chat, t.ChatMessage("user", text)), add_generation_prompt=True)
        req = t.GenerateRequest(
            prompt=prompt,
            sae_id=sae_id,
            interventions=edits,
            sampling=t.Sampling(max_new_tokens=max_new_tokens),
        )
        handles.append(engine.submit_generate(req))
    return [h.result().steered.text for h in handles]


# ---- fluency ---------------------------------------------------------------------------------
@torch.inference_mode()
def _perplexity(engine: Engine, texts: list[str]) -> float:
    """exp(mean negative log-likelihood per token) of the texts, each on its own (BOS-less
    tokenisation; the first token is context), under the unsteered model."""
    total, count = 0.0, 0
    for text in texts:
        ids = engine.rt.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) < 2:
            continue
        x = torch.tensor([ids], device=engine.rt.device)
        logits = engine.rt.model(x).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum")
        total, count = total + float(nll), count + len(ids) - 1
    return math.exp(total / count) if count else float("inf")


def _repetition(engine: Engine, text: str) -> float:
    """Fraction of the text's token 3-grams that repeat an earlier one."""
    ids = engine.rt.tokenizer(text, add_special_tokens=False)["input_ids"]
    grams = [tuple(ids[i : i + 3]) for i in range(len(ids) - 2)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0
