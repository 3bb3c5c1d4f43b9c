"""The report of an evaluation (``saescope.training.evals``): ``eval.json``, two PNG plots (the
feature-density histogram and the distribution of L0 over tokens), and the terminal summary.

Plots use matplotlib's Agg backend (no display needed), imported only when drawing.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from saescope.training.evals import EvalResult

JSON_FILE = "eval.json"
DENSITY_PNG = "feature_density.png"
L0_PNG = "l0.png"


# ---- histograms ------------------------------------------------------------------------------
def density_histogram(density: Tensor, tokens: int) -> dict[str, Any]:
    """Histogram of log10 feature density in tenths of a decade; dead features counted apart.

    The lowest edge is the decade at or below 1/tokens, the rarest density the window can show.
    """
    lo = min(-1, math.floor(math.log10(1 / max(tokens, 1))))
    edges = np.linspace(lo, 0, 10 * -lo + 1)
    alive = density[density > 0].numpy()
    counts, _ = np.histogram(np.log10(alive), bins=edges)
    return {
        "log10_edges": edges.tolist(),
        "counts": counts.tolist(),
        "dead": int((density == 0).sum()),
    }


def l0_histogram(l0: Tensor, max_bins: int = 64) -> dict[str, Any]:
    """Histogram of per-token L0 over integer-centred bins (one value per bin when few)."""
    top = int(l0.max()) if l0.numel() else 0
    width = max(1, math.ceil((top + 1) / max_bins))
    edges = np.arange(0, top + width + 1, width) - 0.5
    counts, _ = np.histogram(l0.numpy(), bins=edges)
    return {"edges": edges.tolist(), "counts": counts.tolist()}


# ---- JSON --------------------------------------------------------------------------------------
def report_dict(result: EvalResult) -> dict[str, Any]:
    """JSON-ready report: provenance, token counts, metrics and both histograms."""
    return {
        **result.info,
        "tokens": result.tokens,
        "model_tokens": result.model_tokens,
        "predicted_tokens": result.predicted_tokens,
        "sequences": result.sequences,
        "dead_window_tokens": result.tokens,
        "metrics": {k: _finite(v) for k, v in asdict(result.metrics).items()},
        "density_histogram": density_histogram(result.feature_density, result.tokens),
        "l0_histogram": l0_histogram(result.l0_per_token),
    }


def _finite(v: float | None) -> float | None:
    """NaN and ±inf become null: JSON has no spelling for them."""
    return v if v is None or math.isfinite(v) else None


def write_report(result: EvalResult, out_dir: Path) -> dict[str, Path]:
    """Write ``eval.json`` and the plots into ``out_dir``; return their paths by kind."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = report_dict(result)
    paths = {"json": out_dir / JSON_FILE, "density": out_dir / DENSITY_PNG, "l0": out_dir / L0_PNG}
    plot_density(report["density_histogram"], result.tokens, paths["density"])
    plot_l0(report["l0_histogram"], result.metrics.l0, paths["l0"])
    report["plots"] = {k: p.name for k, p in paths.items() if k != "json"}
    tmp = paths["json"].with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, paths["json"])  # readers never see half a file
    return paths


# ---- plots -------------------------------------------------------------------------------------
def plot_density(hist: dict[str, Any], tokens: int, path: Path) -> None:
    """Bar chart of log10 feature density, with the dead features noted in the title."""
    fig, ax = _figure()
    edges = np.asarray(hist["log10_edges"])
    ax.bar(edges[:-1], hist["counts"], width=np.diff(edges), align="edge", color="tab:blue")
    ax.set_xlabel("log10 feature density (share of tokens on which the feature fires)")
    ax.set_ylabel("features")
    ax.set_title(f"Feature density over {tokens:,} tokens · {hist['dead']:,} dead (never fired)")
    _save(fig, path)


def plot_l0(hist: dict[str, Any], mean_l0: float, path: Path) -> None:
    """Bar chart of active features per token, with the mean marked."""
    fig, ax = _figure()
    edges = np.asarray(hist["edges"])
    ax.bar(edges[:-1], hist["counts"], width=np.diff(edges), align="edge", color="tab:green")
    ax.axvline(mean_l0, color="black", linestyle="--", label=f"mean L0 = {mean_l0:.1f}")
    ax.set_xlabel("active features per token (L0)")
    ax.set_ylabel("tokens")
    ax.set_title("L0 over evaluated tokens")
    ax.legend()
    _save(fig, path)


def _figure() -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(7, 4), dpi=100)


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---- terminal ----------------------------------------------------------------------------------
def summary(result: EvalResult) -> str:
    """A few aligned lines for people; the JSON holds everything."""
    m, info = result.metrics, result.info

    def num(v: float | None, spec: str = ".4f") -> str:
        return "n/a" if v is None or not math.isfinite(v) else format(v, spec)

    head = [f"{info['checkpoint']}  ({info['model']} @ {info['hookpoint']})"] if info else []
    sae = info.get("sae", {})
    if sae:
        k = f", k={sae['k']}" if sae.get("k") else ""
        head.append(f"SAE {sae['architecture']}{k}: d_in={sae['d_in']} d_sae={sae['d_sae']}")
    rows = [
        f"tokens     {result.tokens:,} evaluated · {result.predicted_tokens:,} predicted "
        f"· {result.sequences:,} windows",
        f"L0         mean {num(m.l0, '.2f')} · p50 {num(m.l0_p50, '.1f')} "
        f"· p90 {num(m.l0_p90, '.1f')}",
        f"FVU        {num(m.fvu)}   mse {num(m.mse, '.4g')}   shrinkage {num(m.shrinkage, '.3f')}"
        f"   ‖x̂‖/‖x‖ {num(m.l2_ratio, '.3f')}",
        f"dead       {num(100 * m.dead_fraction, '.2f')}% of features "
        f"(never active over {result.tokens:,} tokens)",
        f"CE         clean {num(m.ce_clean)} · sae {num(m.ce_sae)} · zero {num(m.ce_zero)}",
        f"recovered  {num(m.ce_recovered)}   ΔCE {num(m.delta_ce)}   "
        f"KL {num(m.kl)} nats (zero-ablated: {num(m.kl_zero)})",
    ]
    return "\n".join(head + rows)
