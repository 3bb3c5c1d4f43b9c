"""The steering evaluation's report: per concept and method, the best result within the fluency
budget, the aggregate, and each judge's accuracy, as Markdown (``STEERING.md``'s tables), and a
plot of concept score against strength and against fluency."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from saescope.service.steer_eval.run import FLUENCY_BUDGET, METHODS, Result, Run


def best_within_budget(runs: list[Run]) -> Run | None:
    """The run with the highest concept score whose relative perplexity is within the budget
    (ties: the more fluent)."""
    fluent = [r for r in runs if r.relative_ppl <= FLUENCY_BUDGET]
    return max(fluent, key=lambda r: (r.concept_score, -r.relative_ppl), default=None)


def summary(result: Result) -> list[dict[str, Any]]:
    """One row per concept: each method's best concept score within the budget (its strength),
    and which steering method (not prompting) came first."""
    by: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for r in result.runs:
        by[(r.concept, r.method)].append(r)
    rows = []
    for concept in dict.fromkeys(r.concept for r in result.runs):
        row: dict[str, Any] = {
            "concept": concept,
            "judge acc.": round(result.judge_accuracy[concept], 2),
        }
        for method in METHODS:
            best = best_within_budget(by.get((concept, method), []))
            row[method] = "–" if best is None else _cell(best)
        rows.append(row)
    return rows


def aggregates(result: Result) -> list[dict[str, Any]]:
    """Per method, the mean over the concepts it ran on of its best harmonic-mean aggregate
    (any strength)."""
    best: dict[tuple[str, str], float] = {}
    for r in result.runs:
        key = (r.concept, r.method)
        best[key] = max(best.get(key, 0.0), r.aggregate)
    rows = []
    for method in METHODS:
        values = [v for (_, m), v in best.items() if m == method]
        mean = round(sum(values) / len(values), 3) if values else "–"
        rows.append({"method": method, "concepts": len(values), "mean best aggregate": mean})
    return rows


def sae_vs_diffmean(result: Result) -> tuple[int, int]:
    """(concepts where an SAE method's best score within the budget reaches DiffMean's, of all)."""
    wins = total = 0
    for row in summary(result):
        total += 1
        diff = _score(row["diffmean"])
        sae = max(_score(row[m]) for m in METHODS if m.startswith("sae_"))
        wins += sae >= diff
    return wins, total


def _cell(r: Run) -> str:
    strength = "" if r.method in ("none", "prompt") else f" ×{r.strength:g}"
    return f"{r.concept_score:.2f}{strength} (ppl {r.relative_ppl:.1f})"


def _score(cell: str) -> float:
    return 0.0 if cell == "–" else float(cell.split()[0])


def markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "_no rows_"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def markdown(result: Result) -> str:
    """The tables and the headline of one evaluation."""
    wins, total = sae_vs_diffmean(result)
    return "\n\n".join(
        [
            "Best concept score per method within the fluency budget (relative perplexity ≤ "
            f"{FLUENCY_BUDGET:g}); cells: score ×strength (relative perplexity); – : no strength "
            "stayed fluent:",
            markdown_table(summary(result)),
            "Mean over concepts of each method's best harmonic mean of concept score and fluency:",
            markdown_table(aggregates(result)),
            f"**An SAE method reaches the difference-in-means vector's score on {wins} of "
            f"{total} concepts** (within the fluency budget).",
        ]
    )


def plot(result: Result, path: Path) -> None:
    """Two panels: each method's concept score against strength (mean over concepts), and every
    run's concept score against its relative perplexity (the fluency budget marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100)
    for i, method in enumerate(METHODS):
        runs = [r for r in result.runs if r.method == method]
        if not runs:
            continue
        colour = f"C{i}"
        strengths = sorted({r.strength for r in runs})
        means = [
            sum(r.concept_score for r in runs if r.strength == s)
            / sum(1 for r in runs if r.strength == s)
            for s in strengths
        ]
        if method in ("none", "prompt"):  # no strength: a level line
            left.axhline(means[0], color=colour, linestyle=":", label=method)
        else:
            left.plot(strengths, means, marker="o", color=colour, label=method)
        right.scatter(
            [r.relative_ppl for r in runs],
            [r.concept_score for r in runs],
            s=14,
            color=colour,
            alpha=0.7,
            label=method,
        )
    left.set_xscale("log", base=2)
    left.set_xlabel("strength (edit norm / ‖difference in means‖)")
    left.set_ylabel("concept score (mean over concepts)")
    left.set_title("Concept score against strength")
    left.legend(fontsize=7)
    right.axvline(FLUENCY_BUDGET, color="black", linestyle="--", linewidth=1)
    right.set_xscale("log")
    right.set_xlabel("relative perplexity (log; dashed: the fluency budget)")
    right.set_ylabel("concept score")
    right.set_title("Every concept × method × strength")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
