"""Diagnostics behind BENCHMARKS.md's recommendations: product changes prototyped here only.

Where a target is missed, these runs measure what a change to the product code would buy,
by patching or subclassing it **in this process only** (nothing under ``service/`` or
``training/`` changes):

- ``activations``: the engine's batching of concurrent activation calls. By hand (all prompts
  sorted by length, batches of 16) vs by hand in arrival order (batches of 16 as they come) vs
  ``Engine.activations_many`` as is on the same arrival-order batches vs the same with
  length-bucketed chunks (a chunk only takes prompts ≥ 75% as long as its longest one, patched
  over ``saescope.service.activations._chunks``).
- ``generation``: one greedy stream of ``model.generate`` vs the engine's decode batcher in
  this process (steered and not): what the engine costs without the service around it.
- ``training``: saescope's training step as is vs with (1) one counting pass for the feature
  statistics (``count`` of active features per feature with one reduction, reused for L0 and
  "fired"), (2) topk: ``b_dec`` folded into the encoder bias (``(x − b_dec)·W_enc`` =
  ``x·W_enc − b_dec·W_enc``, so autograd no longer needs the (N, d_in) input gradient), (3) topk:
  the decoder through ``embedding_bag`` over the k active features instead of a dense matmul;
  (4) biases added inside the matmuls (``addmm``). The variants are cumulative.
  SAELens's trainer runs in the same rounds for the ratio.

    python -m bench.diagnose
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor

from bench import common, train_data
from bench.baseline import Loaded, hand_activations, hf_generate, timing
from bench.trainers import Spec, saescope_trainer, train_saelens
from saescope.training.metrics import FeatureStats, MetricsWindow
from saescope.training.sae import SAE

NAME = "diagnose"


# ---- activations batching ------------------------------------------------------------------------
def bucketed_chunks(ids_list: list[list[int]], max_batch_tokens: int) -> list[list[int]]:
    """As ``activations._chunks``, but a chunk only takes prompts ≥ 75% of its longest."""
    order = sorted(range(len(ids_list)), key=lambda i: -len(ids_list[i]))
    chunks: list[list[int]] = []
    for i in order:
        if chunks:
            first = len(ids_list[chunks[-1][0]])
            fits = first * (len(chunks[-1]) + 1) <= max_batch_tokens
            if fits and len(ids_list[i]) >= 0.75 * first:
                chunks[-1].append(i)
                continue
        chunks.append([i])
    return chunks


def activations_batching(sae_path: Any, *, n: int, batch: int, rounds: int) -> dict[str, Any]:
    from saescope.service import activations
    from saescope.service.engine import Engine
    from saescope.service.types import ActivationsRequest, Prompt

    ld = Loaded.load("default", sae_path)
    engine = Engine("default", {"bench": str(sae_path)}, device="cpu")
    prompts = common.make_prompts(ld.tokenizer, n, min_tokens=16, max_tokens=128)
    ids = [ld.ids(p) for p in prompts]
    n_tokens = sum(len(x) for x in ids)
    reqs = [
        ActivationsRequest([Prompt(text=p)], top_k_per_token=5, top_k_aggregated=10)
        for p in prompts
    ]
    original = activations._chunks

    def engine_pass(chunker: Any) -> float:
        activations._chunks = chunker  # type: ignore[attr-defined]
        try:
            t = time.perf_counter()
            for s in range(0, n, batch):
                engine.activations_many(reqs[s : s + batch])
            return n_tokens / (time.perf_counter() - t)
        finally:
            activations._chunks = original  # type: ignore[attr-defined]

    def hand(arrival: bool) -> float:
        t = time.perf_counter()
        if arrival:
            for s in range(0, n, batch):
                hand_activations(ld, ids[s : s + batch], batch_size=batch)
        else:
            hand_activations(ld, ids, batch_size=batch)
        return n_tokens / (time.perf_counter() - t)

    cases = {
        "by hand, length-sorted batches": partial(hand, False),
        "by hand, arrival-order batches": partial(hand, True),
        "engine as is, arrival-order batches": partial(engine_pass, original),
        "engine + length-bucketed chunks": partial(engine_pass, bucketed_chunks),
    }
    engine_pass(original)
    runs = common.interleave(cases, rounds)
    engine.close()
    base = common.median(runs["by hand, length-sorted batches"])
    rows = [
        {
            "case": name,
            "tokens/s (median)": round(common.median(v), 1),
            "ratio": round(common.median(v) / base, 3),
        }
        for name, v in runs.items()
    ]
    return {"rows": rows, "series": runs, "tokens": n_tokens}


# ---- generation: the engine in process ----------------------------------------------------------
def engine_generation(sae_path: Any, *, max_new_tokens: int, rounds: int) -> dict[str, Any]:
    """``model.generate`` vs the engine's decode batcher, both in this process, one stream."""
    from saescope.service.engine import Engine
    from saescope.service.types import GenerateRequest, Intervention, Prompt, Sampling, TokenEvent

    ld = Loaded.load("default", sae_path)
    engine = Engine("default", {"bench": str(sae_path)}, device="cpu")
    (prompt,) = common.make_prompts(ld.tokenizer, 1, min_tokens=24, max_tokens=24, seed=3)
    ids = ld.ids(prompt)

    def engine_stream(steer: bool) -> float:
        edits = [Intervention(123, "clamp", 8.0)] if steer else []
        req = GenerateRequest(
            Prompt(text=prompt), interventions=edits, sampling=Sampling(max_new_tokens)
        )
        start, times = time.perf_counter(), []
        for item in engine.generate_stream(req):
            if isinstance(item, TokenEvent):
                times.append(time.perf_counter())
        return timing(start, times).decode_tok_s

    cases: dict[str, Callable[[], float]] = {
        "model.generate": lambda: hf_generate(ld, ids, max_new_tokens).decode_tok_s,
        "engine, one feature clamped": partial(engine_stream, True),
        "engine, no intervention": partial(engine_stream, False),
    }
    engine_stream(True)
    runs = common.interleave(cases, rounds)
    engine.close()
    base = common.median(runs["model.generate"])
    rows = [
        {
            "case": name,
            "decode tokens/s (median)": round(common.median(v), 2),
            "ratio": round(common.median(v) / base, 3),
        }
        for name, v in runs.items()
    ]
    return {"rows": rows, "series": runs}


# ---- training-step prototypes --------------------------------------------------------------------
class CountingStats(FeatureStats):
    """``FeatureStats.update`` with one reduction over ``f``: per-feature active counts."""

    last_active = 0.0

    def update(self, f: Tensor) -> None:
        ones = torch.ones(1, len(f), dtype=f.dtype, device=f.device)
        counts = (ones @ (f > 0).to(f.dtype))[0]  # (d_sae,) active tokens per feature
        fired = counts > 0
        self.since_fired += len(f)
        self.since_fired[fired] = 0
        self.counts += counts.double()
        self.last_active = float(counts.sum())
        self.counted_tokens += len(f)
        if self.counted_tokens >= self.window:
            self.last_density = self.counts / self.counted_tokens
            self.counts.zero_()
            self.counted_tokens = 0


class CountingWindow(MetricsWindow):
    """``MetricsWindow.update`` taking L0's numerator from ``CountingStats`` (no second pass)."""

    def __init__(self, d_in: int, stats: CountingStats, device: Any = "cpu") -> None:
        self.stats = stats
        super().__init__(d_in, device)

    @torch.no_grad()
    def update(self, x: Tensor, x_hat: Tensor, f: Tensor, scalars: dict[str, Tensor]) -> None:
        x64 = x.double()
        err = (x64 - x_hat.double()).pow(2).sum()
        l0 = err.new_tensor(self.stats.last_active)
        values = [err, x64.pow(2).sum(), l0]
        values += [scalars[k].detach().double() if k in scalars else err * 0 for k in self.SCALARS]
        self.sums += torch.stack(values)
        self.sum_x += x64.sum(0)
        self.steps += 1
        self.tokens += len(x)


class FusedSAE(SAE):
    """Biases added inside the matmuls (``addmm``): no separate (N, d_sae) and (N, d_in) adds;
    topk also folds ``b_dec`` into the encoder bias, so autograd needs no (N, d_in) input
    gradient — (x − b_dec)·W_enc = x·W_enc − b_dec·W_enc."""

    def encode_pre(self, x: Tensor) -> Tensor:
        if self.cfg.architecture == "topk":
            return torch.addmm(self.b_enc - self.b_dec @ self.W_enc, x, self.W_enc)
        return torch.addmm(self.b_enc, x, self.W_enc)

    def decode(self, f: Tensor) -> Tensor:
        return torch.addmm(self.b_dec, f, self.W_dec)


class SparseDecoderSAE(FusedSAE):
    """topk whose decoder sums the k active rows of W_dec (``embedding_bag``), not a matmul."""

    _top: tuple[Tensor, Tensor] | None = None

    def activate(self, pre: Tensor) -> Tensor:
        assert self.cfg.k is not None
        top = pre.topk(self.cfg.k, dim=-1)
        values = torch.relu(top.values)
        self._top = (top.indices, values)
        return torch.zeros_like(pre).scatter_(-1, top.indices, values)

    def decode(self, f: Tensor) -> Tensor:
        if self._top is None:
            return super().decode(f)
        indices, values = self._top
        self._top = None
        rows = torch.nn.functional.embedding_bag(
            indices, self.W_dec, per_sample_weights=values, mode="sum"
        )  # (N, d_in)
        return rows + self.b_dec


def train_variant(spec: Spec, x: Tensor, sae_cls: type[SAE], counting: bool) -> list[float]:
    """saescope's Trainer with the given SAE class and statistics; the timed steps' durations."""
    trainer = saescope_trainer(spec, sae_cls)
    if counting:
        stats = CountingStats(spec.d_sae, trainer.cfg.dead_window_tokens)
        trainer.features = stats
        trainer.window = CountingWindow(spec.d_in, stats)
    batches = train_data.Batches(x, spec.batch_size)
    trainer.fit(batches)
    return batches.step_times(spec.timed_steps, time.perf_counter())


VARIANTS: dict[str, list[tuple[str, type[SAE], bool]]] = {
    "relu": [
        ("as is", SAE, False),
        ("+ one-pass stats", SAE, True),
        ("+ addmm", FusedSAE, True),
    ],
    "topk": [
        ("as is", SAE, False),
        ("+ one-pass stats", SAE, True),
        ("+ addmm, b_dec folded", FusedSAE, True),
        ("+ sparse decoder", SparseDecoderSAE, True),
    ],
}


def training_steps(
    x: Tensor, *, d_sae: int, batch_size: int, timed: int, rounds: int
) -> dict[str, Any]:
    steps = 2 + 2 + timed  # scale estimate, warm-up, timed
    step_s: dict[str, list[float]] = {}
    for r in range(rounds):
        for arch, variants in VARIANTS.items():
            spec = Spec(arch, x.shape[1], d_sae, batch_size, steps, seed=r, scale_batches=2)  # type: ignore[arg-type]
            cases: dict[str, Any] = {
                f"{arch}: SAELens": lambda spec=spec: train_saelens(spec, x).step_times
            }
            for name, cls, counting in variants:
                cases[f"{arch}: saescope {name}"] = partial(train_variant, spec, x, cls, counting)
            for name in common.rotate(list(cases), r):
                t = common.median(cases[name]()[2:])
                step_s.setdefault(name, []).append(t)
                print(f"  round {r + 1}/{rounds} {name}: {batch_size / t:.0f} tokens/s")
    rows = []
    for name, ts in step_s.items():
        arch = name.split(":")[0]
        ref = common.median(step_s[f"{arch}: SAELens"])
        t = common.median(ts)
        rows.append(
            {
                "step variant": name,
                "tokens/s (median)": round(batch_size / t, 1),
                "step ms": round(1e3 * t, 1),
                "ratio to SAELens": round(ref / t, 3),
            }
        )
    return {"rows": rows, "series": step_s}


def main(argv: list[str] | None = None) -> None:
    common.bench_main(train_data.parser(__doc__ or ""), argv, measure)


def measure(args: argparse.Namespace) -> None:
    import tempfile
    from pathlib import Path

    rounds = args.rounds or (1 if args.quick else 2)
    with tempfile.TemporaryDirectory() as tmp:
        sae = common.build_random_sae(
            Path(tmp) / "sae",
            model="default",
            hookpoint=common.DEFAULT_HOOKPOINT,
            d_in=576,
            d_sae=4096,
        )
        n = 16 if args.quick else 64
        acts = activations_batching(sae, n=n, batch=16, rounds=rounds)
        gen = engine_generation(sae, max_new_tokens=8 if args.quick else 64, rounds=rounds + 1)
    if args.quick:
        x, _ = train_data.activations(4096, 1024, model=args.model, hookpoint=args.hookpoint)
        d_sae, batch = 256, 256
    else:
        x, _ = train_data.activations(train_data.N_TRAIN, train_data.N_EVAL)
        d_sae, batch = 4096, 4096
    train = training_steps(
        x, d_sae=d_sae, batch_size=batch, timed=2 if args.quick else 4, rounds=rounds
    )
    common.write_result(
        args.out,
        NAME,
        title="Diagnostics: product changes prototyped in the bench process",
        params={"rounds": rounds, "activation_tokens": acts["tokens"], "threads": args.threads},
        caption=f"Activations in process (no service), {n} prompts in arrival batches of 16",
        rows=acts["rows"],
        tables={
            "One stream in process (no service)": gen["rows"],
            f"Training step, d_sae {d_sae}, batch {batch}": train["rows"],
        },
        series={
            "activations": acts["series"],
            "generation": gen["series"],
            "training": train["series"],
        },
    )


if __name__ == "__main__":
    main()
