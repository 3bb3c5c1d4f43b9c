"""SynthSAEBench at CPU size: ground-truth feature recovery, saescope vs SAELens, per architecture.

SAELens's SynthSAEBench (``sae_lens.synthetic``, its ``docs/synth_sae_bench.md``) draws
activations from a synthetic model whose features are known: sparse feature activations
(Zipfian firing probabilities, a hierarchy of mutually exclusive children scaled by their
parent, low-rank correlations, magnitudes around 4–5) mapped to a dense hidden space through
near-orthogonal feature vectors plus a bias. An SAE is scored by how well it recovers those
features, with SAELens's own ``eval_sae_on_synthetic_data``: MCC (decoder rows matched
one-to-one to true feature vectors by the Hungarian algorithm, mean |cos|), F1 / precision /
recall of each latent as a detector of its best-matching feature, feature uniqueness,
explained variance, dead latents, L0 and shrinkage.

The model is SynthSAEBench-16k's recipe scaled down to a 2-core CPU: 4096 true features in 256
dimensions (16k in 768 there), 32 hierarchy roots (128 there) with the same branching factor,
depth and mutual exclusion, correlation rank 25 and scale 0.1, 100 orthogonalisation steps,
the same firing probabilities and magnitudes, seed 42. SAEs are 4× narrower than the true
feature count, as recommended there (1024 latents; 4096 for 16k), and topk / batchtopk /
matryoshka keep k = 12, about the true L0 of the 1024 most frequent features (measured). Training is
768 steps of 1024 fresh samples (786,432 tokens; SynthSAEBench trains 200M), lr 1e-3; both
trainers read the same rows in the same order (``bench.trainers``: same hyperparameters,
normalisation, schedule; the SAELens side is its own ``SAETrainer``). ``relu``'s λ and
``jumprelu``'s L0 coefficient are the same for both trainers. Every SAE is evaluated on the
same 16,384 held-out samples, in batches of the training batch size (as SAELens's
``SyntheticSAERunner`` does: its BatchTopK SAEs then keep the batch's top k, saescope's use
their learned threshold). MCC depends on the decoder only.

Target: saescope's MCC ≥ SAELens's for every architecture (ratio ≥ 1.0).

The synthetic model and its samples are cached under ``~/.cache/saescope/bench/`` (generating
them takes ~5 minutes on a 2-core CPU, the training ~8).

    python -m bench.synth_bench
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
import warnings
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor

from bench import common, train_data
from bench.trainers import TRAINERS, Arch, Spec

NAME = "synth_bench"
TARGET_RATIO = 1.0
VERSION = 1  # bump when the recipe of the model or its samples changes
ARCHS: tuple[Arch, ...] = ("relu", "topk", "batchtopk", "jumprelu", "matryoshka")


@dataclass(frozen=True)
class World:
    """The synthetic model's size and the samples drawn from it."""

    num_features: int
    hidden_dim: int
    roots: int  # hierarchy root nodes (branching factor 4, depth 3)
    ortho_steps: int
    n_train: int
    n_eval: int
    seed: int = 42

    def config(self) -> Any:
        """SynthSAEBench-16k's ``SyntheticModelConfig`` at this size."""
        from sae_lens.synthetic import (
            FoldedNormalMagnitudeConfig,
            HierarchyConfig,
            LinearMagnitudeConfig,
            LowRankCorrelationConfig,
            OrthogonalizationConfig,
            SyntheticModelConfig,
            ZipfianFiringProbabilityConfig,
        )

        return SyntheticModelConfig(
            num_features=self.num_features,
            hidden_dim=self.hidden_dim,
            firing_probability=ZipfianFiringProbabilityConfig(
                exponent=0.5, max_prob=0.4, min_prob=5e-4
            ),
            hierarchy=HierarchyConfig(
                total_root_nodes=self.roots,
                branching_factor=4,
                max_depth=3,
                mutually_exclusive_portion=1.0,
                mutually_exclusive_min_depth=0,
                compensate_probabilities=True,
                scale_children_by_parent=True,
            ),
            orthogonalization=(
                OrthogonalizationConfig(num_steps=self.ortho_steps, lr=3e-4)
                if self.ortho_steps
                else None
            ),
            correlation=LowRankCorrelationConfig(rank=25, correlation_scale=0.1),
            mean_firing_magnitudes=LinearMagnitudeConfig(start=5.0, end=4.0),
            std_firing_magnitudes=FoldedNormalMagnitudeConfig(mean=0.5, std=0.5),
            bias=0.5,
            seed=self.seed,
        )


class Replay:
    """Stands in for an ``ActivationGenerator`` in ``eval_sae_on_synthetic_data``: hands out the
    rows of fixed feature activations in order, so every SAE is evaluated on the same samples."""

    def __init__(self, feature_acts: Tensor) -> None:
        self.feature_acts, self.i = feature_acts, 0

    def sample(self, n: int) -> Tensor:
        out = self.feature_acts[self.i : self.i + n]
        self.i += n
        return out


def world(w: World, *, cache: bool = True) -> tuple[Any, Tensor, Tensor]:
    """``(model, train (n_train, hidden_dim), eval feature activations (n_eval, num_features))``
    from the cache if there, else built (SAELens's ``SyntheticModel``) and sampled: training
    rows from torch seed ``w.seed``, evaluation rows from ``w.seed + 1``."""
    from sae_lens.synthetic import SyntheticModel
    from safetensors.torch import load_file, save_file

    key = json.dumps([VERSION, w.config().to_dict(), w.n_train, w.n_eval], sort_keys=True)
    folder = train_data.cache_dir() / f"synth-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    samples = folder / "samples.safetensors"
    if cache and samples.is_file():
        t = load_file(str(samples))
        shape = t["eval_shape"].tolist()
        acts = torch.sparse_coo_tensor(
            t["eval_index"], t["eval_value"], shape, check_invariants=True
        )
        return SyntheticModel.load_from_disk(folder), t["train"], acts.to_dense()
    start = time.perf_counter()
    model = SyntheticModel(w.config())
    train_parts = []
    torch.manual_seed(w.seed)
    for i in range(0, w.n_train, 8192):
        train_parts.append(model.sample(min(8192, w.n_train - i)))
    torch.manual_seed(w.seed + 1)
    feats = model.activation_generator.sample(w.n_eval)
    train = torch.cat(train_parts)
    print(
        f"synthetic model + {w.n_train} + {w.n_eval} samples in {time.perf_counter() - start:.0f} s"
    )
    if cache:
        folder.mkdir(parents=True, exist_ok=True)
        model.save(folder)
        sparse = feats.to_sparse().coalesce()
        tmp = samples.with_suffix(".tmp")
        tensors = {
            "train": train,
            "eval_index": sparse.indices(),
            "eval_value": sparse.values(),
            "eval_shape": torch.tensor(list(feats.shape)),
        }
        save_file(tensors, str(tmp))
        tmp.rename(samples)
    return model, train, feats


def synth_eval(sae: Any, model: Any, feature_acts: Tensor, batch_size: int) -> dict[str, float]:
    """SAELens's ``eval_sae_on_synthetic_data`` of ``sae`` (model units) on ``feature_acts``."""
    from sae_lens.synthetic import eval_sae_on_synthetic_data

    r = eval_sae_on_synthetic_data(
        cast(Any, sae),
        model.feature_dict,
        cast(Any, Replay(feature_acts)),
        num_samples=len(feature_acts),
        batch_size=batch_size,
    )
    return {
        "mcc": r.mcc,
        "f1": r.classification.f1_score,
        "precision": r.classification.precision,
        "recall": r.classification.recall,
        "uniqueness": r.uniqueness,
        "explained_variance": r.explained_variance,
        "dead_latents": r.dead_latents,
        "l0": r.sae_l0,
        "true_l0": r.true_l0,
        "shrinkage": r.shrinkage,
    }


def run(
    w: World,
    *,
    d_sae: int,
    batch_size: int,
    lr: float,
    k: int,
    l1: float,
    l0_coefficient: float,
    prefixes: tuple[int, ...],
    archs: tuple[Arch, ...] = ARCHS,
    device: str = "cpu",
) -> dict[str, Any]:
    start = time.perf_counter()
    model, x, eval_feats = world(w)
    steps = len(x) // batch_size
    # firing rates on the held-out samples (after the hierarchy, unlike the configured ones)
    top = (eval_feats > 0).float().mean(0).sort(descending=True).values
    points: list[dict[str, Any]] = []
    for arch in archs:
        coefficient = {"relu": l1, "jumprelu": l0_coefficient}.get(arch, 0.0)
        for name in TRAINERS:
            spec = Spec(
                arch,
                w.hidden_dim,
                d_sae,
                batch_size,
                steps,
                lr=lr,
                l1=coefficient,
                k=k,
                prefixes=prefixes,
                device=device,
            )
            t = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # SAELens's notes on its own config defaults
                trained = TRAINERS[name](spec, x)
            seconds = time.perf_counter() - t
            m = synth_eval(trained.sae, model, eval_feats, batch_size)
            points.append({"trainer": name, "architecture": arch, "train_s": seconds} | m)
            print(
                f"  {arch} {name}: MCC {m['mcc']:.4f} F1 {m['f1']:.4f} "
                f"EV {m['explained_variance']:.4f} L0 {m['l0']:.1f} dead {m['dead_latents']} "
                f"({seconds:.0f} s)",
                flush=True,
            )

    targets = []
    for arch in archs:
        by = {p["trainer"]: p for p in points if p["architecture"] == arch}
        ours, theirs = by["saescope"], by["SAELens"]
        targets.append(
            common.Target(
                f"{arch}: saescope MCC / SAELens MCC",
                ours["mcc"] / theirs["mcc"],
                TARGET_RATIO,
                ">=",
                f"MCC {ours['mcc']:.4f} vs {theirs['mcc']:.4f}; L0 {ours['l0']:.1f} vs "
                f"{theirs['l0']:.1f}",
            )
        )
    rows = [
        {
            "architecture": p["architecture"],
            "trainer": p["trainer"],
            "L0": round(p["l0"], 1),
            "MCC": round(p["mcc"], 4),
            "F1": round(p["f1"], 4),
            "precision": round(p["precision"], 4),
            "recall": round(p["recall"], 4),
            "uniqueness": round(p["uniqueness"], 4),
            "explained variance": round(p["explained_variance"], 4),
            "dead latents": p["dead_latents"],
            "shrinkage": round(p["shrinkage"], 3),
            "train s": round(p["train_s"], 1),
        }
        for p in points
    ]
    params = {
        "num_features": w.num_features,
        "hidden_dim": w.hidden_dim,
        "hierarchy_roots": w.roots,
        "true_l0": round(points[0]["true_l0"], 1) if points else None,
        f"true_l0_top{d_sae}": round(float(top[:d_sae].sum()), 1),
        "d_sae": d_sae,
        "batch_size": batch_size,
        "steps": steps,
        "tokens": steps * batch_size,
        "eval_tokens": len(eval_feats),
        "lr": lr,
        "k": k,
        "relu_l1": l1,
        "jumprelu_l0_coefficient": l0_coefficient,
        "matryoshka_widths": [*prefixes, d_sae],
        "wall_s": round(time.perf_counter() - start),
    }
    return {"params": params, "rows": rows, "targets": targets, "series": {"points": points}}


def measure(args: argparse.Namespace) -> None:
    if args.quick:
        w = World(num_features=256, hidden_dim=32, roots=4, ortho_steps=0, n_train=3072, n_eval=512)
        sizes = {"d_sae": 64, "batch_size": 256, "k": 4, "prefixes": (16, 32)}
    else:
        w = World(
            num_features=4096,
            hidden_dim=256,
            roots=32,
            ortho_steps=100,
            n_train=768 * 1024,
            n_eval=16384,
        )
        sizes = {"d_sae": 1024, "batch_size": 1024, "k": 12, "prefixes": (128, 256, 512)}
    res = run(w, lr=1e-3, l1=5.0, l0_coefficient=1.0, device=args.device, **sizes)  # type: ignore[arg-type]
    common.write_run(
        args, NAME, res, title="SynthSAEBench (CPU size): ground-truth feature recovery"
    )


def main(argv: list[str] | None = None) -> None:
    common.bench_main(train_data.parser(__doc__ or ""), argv, measure)


if __name__ == "__main__":
    main()
