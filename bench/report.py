"""Regenerate BENCHMARKS.md's tables and the PNG plots from ``bench/results/*.json``.

BENCHMARKS.md holds generated blocks between ``<!-- bench:begin NAME -->`` and
``<!-- bench:end NAME -->`` markers (``machine``, ``targets`` and one per bench); everything
outside them is written by hand and kept. A bench without a result file keeps its block.

    python -m bench.report
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import RESULTS_DIR, ROOT

DOC = ROOT / "BENCHMARKS.md"
ORDER = (
    "serve_activations",
    "serve_steering",
    "serve_streams",
    "serve_contrast",
    "serve_fairness",
    "serve_overhead",
    "serve_memory",
    "serve_sae_pool",
    "serve_replicas",
    "train_speed",
    "train_quality",
    "synth_bench",
    "train_workers",
    "sae_dtype",
    "catalog_speed",
    "web_latency",
    "search_recall",
    "wire_convert",
)
Result = dict[str, Any]


# ---- markdown ------------------------------------------------------------------------------------
def table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "_no rows_"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def _cell(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _met(t: dict[str, Any]) -> str:
    return "**met**" if t["met"] else "**missed**"


def bench_block(res: Result) -> str:
    m, p = res["machine"], res["params"]
    params = ", ".join(f"{k} = {v}" for k, v in p.items())
    lines = [
        f"_{m['date']}, commit `{m['commit']}`, load average {m['loadavg'][0]} at start; "
        f"{params}._",
        "",
    ]
    if res.get("caption"):
        lines += [f"{res['caption']}:", ""]
    lines.append(table(res["rows"]))
    for heading, rows in res.get("tables", {}).items():
        lines += ["", f"{heading}:", "", table(rows)]
    if res["targets"]:
        lines += ["", table(_target_rows(res["targets"]))]
    if (RESULTS_DIR / f"{res['name']}.png").is_file():
        lines += ["", f"![{res['title']}](bench/results/{res['name']}.png)"]
    return "\n".join(lines)


def _target_rows(targets: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "metric": t["metric"],
            "measured": round(t["value"], 3),
            "target": f"{t['op']} {t['target']:g}",
            "verdict": _met(t),
            "note": t.get("note") or "",
        }
        for t in targets
    ]


def machine_block(results: list[Result]) -> str:
    if not results:
        return "_no results yet_"
    m = results[0]["machine"]
    lines = [
        table(
            [
                {
                    "nproc": m["nproc"],
                    "CPU": m["cpu"],
                    "RAM GiB": m["ram_gib"],
                    "GPU": m["gpu"] or "none",
                    "Python": m["python"],
                    "torch": m["torch"],
                    "torch threads": m["torch_threads"],
                }
            ]
        ),
        "",
        table(
            [
                {
                    "bench": r["name"],
                    "commit": r["machine"]["commit"],
                    "date": r["machine"]["date"],
                    "load average (1/5/15 min) at start": " / ".join(
                        str(x) for x in r["machine"]["loadavg"]
                    ),
                }
                for r in results
            ]
        ),
    ]
    return "\n".join(lines)


def targets_block(results: list[Result]) -> str:
    rows = [{"bench": r["name"]} | t for r in results for t in _target_rows(r["targets"])]
    return table(rows) if rows else "_no targets measured yet_"


# ---- plots ---------------------------------------------------------------------------------------
def _bars(ax: Any, labels: list[str], runs: list[list[float]], ylabel: str) -> None:
    """Median bars with every round's value as a dot."""
    import statistics

    xs = range(len(labels))
    ax.bar(xs, [statistics.median(r) if r else 0 for r in runs], color="#8fb3d9")
    for x, r in zip(xs, runs, strict=True):
        ax.plot([x] * len(r), r, "k.", ms=4)
    ax.set_xticks(list(xs), labels, rotation=15, ha="right")
    ax.set_ylabel(ylabel)


def plot_serve_activations(res: Result, ax: Any) -> None:
    s = res["series"]
    names = list(s)
    _bars(ax, names, [s[n] for n in names], "tokens/s")
    ax.set_title("GetFeatureActivations vs by hand")


def plot_serve_steering(res: Result, ax: Any) -> None:
    s = res["series"]
    names = list(s)
    _bars(ax, names, [[t["decode_tok_s"] for t in s[n]] for n in names], "decode tokens/s")
    ax.set_title("one stream: decode speed")


def plot_serve_streams(res: Result, ax: Any) -> None:
    s = res["series"]
    ns = [int(k[1:]) for k in s]
    agg = [sorted(d["aggregate_tok_s"] for d in s[k])[len(s[k]) // 2] for k in s]
    ax.plot(ns, agg, "o-", label="aggregate (median)")
    ax.plot(ns, [agg[0] * n for n in ns], ":", color="grey", label="linear in streams")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent steered streams")
    ax.set_ylabel("tokens/s")
    ax.legend()
    ax.set_title("concurrent steered streams")


def plot_serve_contrast(res: Result, ax: Any) -> None:
    s = res["series"]
    _bars(ax, list(s), [s[n] for n in s], "seconds")
    ax.set_title("contrast search vs activations")


def plot_serve_overhead(res: Result, ax: Any) -> None:
    for name, xs in res["series"].items():
        ms = sorted(1e3 * x for x in xs)
        ax.plot(ms, [(i + 1) / len(ms) for i in range(len(ms))], label=name)
    ax.set_xscale("log")
    ax.set_xlabel("latency ms")
    ax.set_ylabel("fraction of calls")
    ax.legend(fontsize=7, loc="lower center")
    ax.set_title("per-call latency (CDF)")


def plot_serve_fairness(res: Result, ax: Any) -> None:
    for name, xs in res["series"]["latency_s"].items():
        ms = sorted(1e3 * x for x in xs)
        ax.plot(ms, [(i + 1) / len(ms) for i in range(len(ms))], "o-", ms=3, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("small-call latency ms")
    ax.set_ylabel("fraction of calls")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("small calls alone / beside a big call (CDF)")


def plot_serve_memory(res: Result, ax: Any) -> None:
    s = res["series"]
    ax.plot(s["calls"], s["rss_mib"], "o-")
    ax.set_xlabel("calls")
    ax.set_ylabel("replica RSS MiB")
    lo = min(s["rss_mib"])
    ax.set_ylim(lo - 100, max(s["rss_mib"]) + 100)
    ax.set_title("replica resident memory")


def plot_train_speed(res: Result, ax: Any) -> None:
    s = {k: v for k, v in res["series"].items() if "/" in k}
    batch = res["params"]["batch_size"]
    _bars(ax, list(s), [[batch / t for t in s[k]] for k in s], "tokens/s")
    ax.set_title("SAE training speed (same activations)")


def _l0_fvu(points: list[dict[str, Any]], trainer: str, arch: str) -> list[tuple[float, float]]:
    """``(L0, FVU)`` of the quality points of one trainer and architecture, in series order."""
    return [
        (p["l0"], p["fvu"]) for p in points if p["trainer"] == trainer and p["architecture"] == arch
    ]


def plot_train_quality(res: Result, ax: Any) -> None:
    pts = res["series"]["points"]
    for trainer, marker in (("saescope", "o"), ("SAELens", "s")):
        for arch, line in (("relu", "-"), ("jumprelu", "--")):  # swept: a curve each
            curve = sorted(_l0_fvu(pts, trainer, arch))
            if curve:
                ax.plot(
                    [a for a, _ in curve],
                    [b for _, b in curve],
                    marker + line,
                    label=f"{trainer} {arch} (λ sweep)",
                )
        for arch in ("topk", "batchtopk"):  # one point each
            point = _l0_fvu(pts, trainer, arch)
            if point:
                ax.plot(
                    [a for a, _ in point],
                    [b for _, b in point],
                    marker,
                    ms=9,
                    mfc="none",
                    label=f"{trainer} {arch}",
                )
    ax.set_xscale("log")
    ax.set_xlabel("L0 (held out)")
    ax.set_ylabel("FVU (held out)")
    ax.legend(fontsize=7)
    ax.set_title("FVU vs L0 at equal tokens")


def plot_synth_bench(res: Result, ax: Any) -> None:
    pts = res["series"]["points"]
    archs = list(dict.fromkeys(p["architecture"] for p in pts))
    width = 0.4
    for i, (trainer, color) in enumerate((("saescope", "#4c72b0"), ("SAELens", "#dd8452"))):
        mcc = {p["architecture"]: p["mcc"] for p in pts if p["trainer"] == trainer}
        xs = [j + (i - 0.5) * width for j in range(len(archs))]
        ax.bar(xs, [mcc.get(a, 0.0) for a in archs], width, color=color, label=trainer)
    ax.set_xticks(range(len(archs)), archs)
    ax.set_ylabel("MCC (decoder vs true features)")
    ax.legend(fontsize=7)
    ax.set_title("SynthSAEBench (CPU size): feature recovery")


PLOTS: dict[str, Callable[[Result, Any], None]] = {
    "serve_activations": plot_serve_activations,
    "serve_steering": plot_serve_steering,
    "serve_streams": plot_serve_streams,
    "serve_contrast": plot_serve_contrast,
    "serve_overhead": plot_serve_overhead,
    "serve_fairness": plot_serve_fairness,
    "serve_memory": plot_serve_memory,
    "train_speed": plot_train_speed,
    "train_quality": plot_train_quality,
    "synth_bench": plot_synth_bench,
}


def plot(res: Result, out_dir: Path) -> Path | None:
    draw = PLOTS.get(res["name"])
    if draw is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    draw(res, ax)
    fig.tight_layout()
    path = out_dir / f"{res['name']}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- BENCHMARKS.md -------------------------------------------------------------------------------
def replace_block(text: str, name: str, body: str) -> str:
    begin, end = f"<!-- bench:begin {name} -->", f"<!-- bench:end {name} -->"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    block = f"{begin}\n{body}\n{end}"
    if pattern.search(text):
        return pattern.sub(lambda _: block, text)
    return text.rstrip("\n") + f"\n\n{block}\n"


def load_results(results_dir: Path = RESULTS_DIR) -> list[Result]:
    found = {p.stem: json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))}
    return [found[n] for n in ORDER if n in found]


def main(argv: list[str] | None = None) -> None:
    del argv
    results = load_results()
    for res in results:
        plot(res, RESULTS_DIR)
    text = DOC.read_text() if DOC.is_file() else "# saescope benchmarks\n"
    text = replace_block(text, "machine", machine_block(results))
    text = replace_block(text, "targets", targets_block(results))
    for res in results:
        text = replace_block(text, res["name"], bench_block(res))
    DOC.write_text(text)
    print(f"wrote {DOC} ({len(results)} results)")


if __name__ == "__main__":
    main(sys.argv[1:])
