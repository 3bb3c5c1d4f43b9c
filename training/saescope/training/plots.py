"""PNG plots of a training run's metrics (``metrics.jsonl`` → ``metrics.png``).

matplotlib is imported inside the function with the Agg backend, so importing this module
costs nothing and plotting works on machines without a display.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# (metric, title, log-scale y)
PANELS: tuple[tuple[str, str, bool], ...] = (
    ("loss", "loss (normalised units)", True),
    ("mse", "MSE  mean ‖x − x̂‖²", True),
    ("fvu", "FVU (centred)", True),
    ("l0", "L0 (active features / token)", True),
    ("sparsity", "sparsity  Σ f_i‖W_dec,i‖", False),
    ("dead_frac", "dead fraction", False),
    ("lr", "learning rate", False),
    ("l1_coefficient", "λ", False),
    ("aux_k", "AuxK", True),
    ("tokens_per_s", "tokens / s", False),
)


def plot_metrics(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Draw every metric present in ``records`` against tokens; None when there is nothing."""
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    panels = [p for p in PANELS if any(p[0] in r for r in records)]
    cols = 3
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    tokens = [r["tokens"] for r in records]
    for ax, (key, title, log) in zip(axes.flat, panels, strict=False):
        xs = [t for t, r in zip(tokens, records, strict=True) if key in r]
        ys = [r[key] for r in records if key in r]
        ax.plot(xs, ys, lw=1.2)
        if log and all(y > 0 for y in ys):
            ax.set_yscale("log")
        if key == "dead_frac":
            title += f" (window {records[-1].get('dead_window_tokens', '?'):,} tokens)"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("tokens", fontsize=8)
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 250k, 1M
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
