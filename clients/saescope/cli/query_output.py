"""How ``saescope query`` prints results: JSON for scripts, or tables and highlighted tokens
for people. ANSI colours only when stdout is a terminal (and ``NO_COLOR`` is unset)."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import textwrap
from collections.abc import Callable, Sequence
from typing import Any

from saescope.client import (
    ActivatingExample,
    Activations,
    Attribution,
    Completion,
    ContrastHit,
    ContrastResult,
    Feature,
    FeatureLabel,
    FeaturePage,
    FeatureSearch,
    GenerationResult,
    Histogram,
    Info,
    Token,
    Tokenization,
)

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Background shades from pale yellow to deep orange (xterm-256), weakest to strongest.
_SHADES = (230, 229, 222, 221, 215, 209, 208, 202)


def emit(args: argparse.Namespace, result: Any, human: Callable[[], None]) -> None:
    """``--json``: the result as one JSON document; otherwise the human rendering."""
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, ensure_ascii=False))
    else:
        human()


def _colour() -> bool:
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def _style(text: str, code: str) -> str:
    return f"\x1b[{code}m{text}\x1b[0m" if _colour() else text


def _bold(text: str) -> str:
    return _style(text, "1")


def _dim(text: str) -> str:
    return _style(text, "2")


def _highlight(text: str, strength: float) -> str:
    """``text`` on a background as strong as ``strength`` in [0, 1] (plain without colour)."""
    if not _colour() or strength <= 0:
        return text
    shade = _SHADES[min(int(strength * len(_SHADES)), len(_SHADES) - 1)]
    return f"\x1b[48;5;{shade}m\x1b[38;5;16m{text}\x1b[0m"


def show(text: str) -> str:
    """A token quoted, whitespace and control characters made visible."""
    return json.dumps(text, ensure_ascii=False)


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]], indent: str = "  ") -> None:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    header = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()
    print(indent + _bold(header))
    for row in cells:
        print(indent + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _features(pairs: Sequence[Any], n: int | None = None) -> str:
    return " · ".join(f"{p.feature} {p.value:.2f}" for p in pairs[:n]) or "-"


# ---- info and tokens ----------------------------------------------------------------------
def info(result: Info, target: str) -> None:
    chat = "yes" if result.has_chat_template else "no"
    print(f"{_bold('model')}    {result.model}  ({result.dtype} on {result.device})")
    print(
        f"{_bold('shape')}    {result.num_layers} layers · d_model {result.d_model} · "
        f"vocab {result.vocab_size} · chat template {chat}"
    )
    print(f"{_bold('server')}   saescope {result.version} at {target}")
    print()
    rows = []
    for s in result.saes:
        mark = "*" if s.sae_id == result.default_sae_id else " "
        metrics = " ".join(f"{k}={v:.3g}" for k, v in sorted(s.metrics.items()))
        arch = f"{s.architecture} k={s.k}" if s.k else s.architecture
        rows.append([f"{mark} {s.sae_id}", s.hookpoint, s.d_in, s.d_sae, arch, metrics or "-"])
    _table(["SAE (* default)", "hookpoint", "d_in", "d_sae", "arch", "metrics"], rows)
    lim = result.limits
    print()
    print(
        f"{_bold('limits')}   prompts {lim.max_prompts} · tokens/prompt "
        f"{lim.max_tokens_per_prompt} · top_k {lim.max_top_k} · new tokens {lim.max_new_tokens}"
        f" · features {lim.max_features} · contrast prompts {lim.max_contrast_prompts}"
    )


def tokenization(result: Tokenization) -> None:
    print(f"{_bold('text')} {show(result.text)}")
    rows = [
        [i, t.id, show(t.text), f"{t.start}-{t.end}", "special" if t.special else ""]
        for i, t in enumerate(result.tokens)
    ]
    _table(["#", "id", "token", "span", ""], rows)
    print(_dim(f"{len(result.tokens)} tokens"))


def _example(x: ActivatingExample) -> str:
    """An example's text with its tokens shaded by the feature's value and the token where it
    peaks in bold; without colour, that token in «brackets». Newlines made visible."""
    if _colour():
        peak = max(x.values, default=0.0) or 1.0
        parts = [
            _highlight(_bold(t.text) if i == x.max_position else t.text, v / peak)
            for i, (t, v) in enumerate(zip(x.tokens, x.values, strict=True))
        ]
        return "".join(parts).replace("\n", "↵")
    text = "".join(f"«{t.text}»" if i == x.max_position else t.text for i, t in enumerate(x.tokens))
    return text.replace("\n", "↵")


def _highlighted(tokens: Sequence[Token], strengths: Sequence[float]) -> str:
    peak = max(strengths, default=0.0) or 1.0
    return "".join(_highlight(t.text, s / peak) for t, s in zip(tokens, strengths, strict=True))


# ---- activations --------------------------------------------------------------------------
def activations(result: Activations, aggregation: str) -> None:
    for n, prompt in enumerate(result):
        if n:
            print()
        print(
            _bold(f"prompt {n + 1}/{len(result)}")
            + f" · {len(prompt)} tokens · SAE {result.sae_id}"
        )
        # Out-of-distribution positions (the attention sink) carry huge, meaningless values.
        strongest = [
            t.top_features[0].value if t.top_features and not t.out_of_distribution else 0.0
            for t in prompt
        ]
        if _colour():
            print("  " + _highlighted([t.token for t in prompt], strongest))
        headers = ["#", "token", "top features", *(f"f{f}" for f in prompt.feature_ids)]
        rows = [
            [
                i,
                show(t.text) + (" *" if t.out_of_distribution else ""),
                _features(t.top_features),
                *(f"{v:.2f}" for v in t.feature_values),
            ]
            for i, t in enumerate(prompt)
        ]
        _table(
            [*headers, "‖err‖/‖x‖"],
            [[*r, f"{t.relative_error:.2f}"] for r, t in zip(rows, prompt, strict=True)],
        )
        if any(t.out_of_distribution for t in prompt):
            print(_dim("  * a position the SAE never saw in training (attention sink or norm"))
            print(_dim("    outlier): its values are not meaningful; top features leave it out"))
        if prompt.top_features:
            print(f"  {_bold(f'top features ({aggregation})')}: {_features(prompt.top_features)}")


# ---- generation ---------------------------------------------------------------------------
def _summary(c: Completion) -> str:
    fired = "".join(
        f" · intervention {f.intervention} fired at {len(f.positions)} positions" for f in c.fired
    )
    return f"{len(c.tokens)} tokens · finish: {c.finish_reason}{fired}"


def generation_details(result: GenerationResult, logprobs: bool, trace: bool) -> None:
    """After streamed text: the summary (stderr), and per-token details when asked for."""
    print(_dim(_summary(result.steered)), file=sys.stderr)
    if logprobs:
        rows = [
            [i, show(t.text), f"{lp:.3f}"]
            for i, (t, lp) in enumerate(
                zip(result.steered.tokens, result.steered.logprobs, strict=False)
            )
        ]
        _table(["#", "token", "logprob"], rows)
    if trace:
        for tr in result.steered.trace:
            pairs = " ".join(
                f"{o:.2f}→{s:.2f}" for o, s in zip(tr.original, tr.steered, strict=False)
            )
            print(f"  {_bold(f'feature {tr.feature}')} (read→steered per position): {pairs}")


def side_by_side(result: GenerationResult) -> None:
    """Steered and baseline completions in two columns (or the steered one alone)."""
    if result.baseline is None:
        print(result.steered.text)
        print(_dim(_summary(result.steered)), file=sys.stderr)
        return
    width = max(20, (shutil.get_terminal_size((100, 24)).columns - 3) // 2)
    columns = []
    for title, c in (("steered", result.steered), ("baseline", result.baseline)):
        columns.append([_bold(title), *_wrap(c.text, width), _dim(_summary(c))])
    left, right = columns
    for i in range(max(len(left), len(right))):
        a = left[i] if i < len(left) else ""
        b = right[i] if i < len(right) else ""
        print(f"{_pad(a, width)} │ {b}".rstrip())


def _pad(text: str, width: int) -> str:
    """``text`` padded to ``width`` visible characters (ANSI codes take no room)."""
    return text + " " * max(0, width - len(_ANSI.sub("", text)))


def _wrap(text: str, width: int) -> list[str]:
    lines: list[str] = []
    for paragraph in text.strip("\n").split("\n"):
        lines.extend(textwrap.wrap(paragraph, width) or [""])
    return lines


# ---- contrast and features ----------------------------------------------------------------
def _hits(title: str, hits: Sequence[ContrastHit]) -> None:
    print(_bold(title))
    if not hits:
        print("  (none)")
        return
    rows = [
        [
            h.feature,
            f"{h.mean_positive:.3g}",
            f"{h.mean_negative:.3g}",
            f"{h.mean_difference:+.3g}",
            f"{h.effect_size:+.2f}",
            f"{h.auroc:.2f}",
            f"{h.p_value_corrected:.2g}",
            f"{h.frac_active_positive:.0%}",
            f"{h.frac_active_negative:.0%}",
            *([] if h.output_score is None else [f"{h.output_score:+.3f}"]),
        ]
        for h in hits
    ]
    scored = ["output"] if hits[0].output_score is not None else []
    _table(
        [
            "feature",
            "mean+",
            "mean−",
            "diff",
            "g",
            "AUROC",
            "p (BH)",
            "active+",
            "active−",
            *scored,
        ],
        rows,
    )
    for h in hits:
        if h.locations:
            where = " · ".join(
                f"{'+' if x.positive else '−'}{x.prompt_index}[{x.token_index}] "
                f"{show(x.token)} {x.value:.2f}"
                for x in h.locations
            )
            print(f"  {h.feature} fires at: {where}")


def contrast(result: ContrastResult) -> None:
    print(_dim(f"SAE {result.sae_id} · {result.features_tested} features tested"))
    _hits("more active with the concept (positive set)", result.positive_hits)
    print()
    _hits("more active without it (negative set)", result.negative_hits)
    if result.difference_in_means is not None:
        print()
        print(
            _dim(
                f"difference in means of the residual stream: norm "
                f"{result.difference_in_means_norm:.2f} (steer with it: --save-direction FILE, "
                "then steer --direction FILE=V)"
            )
        )


def feature(result: Feature) -> None:
    density = "unknown" if result.density is None else f"{result.density:.3%}"
    print(_bold(f"feature {result.feature}") + f" of SAE {result.sae_id}")
    print(
        f"  decoder norm {result.decoder_norm:.3f} · encoder norm {result.encoder_norm:.3f} · "
        f"encoder bias {result.encoder_bias:+.3f} · density {density}"
    )
    n = max(len(result.promoted), len(result.suppressed))
    rows = []
    for i in range(n):
        p = result.promoted[i] if i < len(result.promoted) else None
        s = result.suppressed[i] if i < len(result.suppressed) else None
        rows.append(
            [
                show(p.token) if p else "",
                f"{p.score:+.2f}" if p else "",
                show(s.token) if s else "",
                f"{s.score:+.2f}" if s else "",
            ]
        )
    if rows:
        _table(["promotes", "", "suppresses", ""], rows)
    if result.nearest:
        near = " · ".join(f"{x.feature} ({x.cosine:.2f})" for x in result.nearest)
        print(f"  {_bold('nearest')}: {near}")
    if result.label is not None:
        _label(result.label)
    if result.cofiring:
        fires = " · ".join(f"{x.feature} ({x.cosine:.0%})" for x in result.cofiring)
        print(f"  {_bold('fires with')}: {fires}")
    if result.top_examples:
        print(_bold("  top examples") + _dim(f" (of {result.catalog_tokens} catalog tokens)"))
        for x in result.top_examples:
            print(f"  {x.max_value:7.2f}  {_example(x)}")
        if result.next_examples_page_token:
            print(_dim(f"  more: --examples-page-token {result.next_examples_page_token}"))
    for b in result.quantile_examples:
        print(_bold(f"  values in [{b.lower:.2f}, {b.upper:.2f})"))
        for x in b.examples:
            print(f"  {x.max_value:7.2f}  {_example(x)}")
        if not b.examples:
            print(_dim("     (none)"))
    if result.histogram is not None:
        print(f"  {_bold('histogram')}: {histogram_summary(result.histogram)}")
    if result.direction is not None:
        print(_dim(f"  direction: {len(result.direction)} floats (use --json)"))


def _label(label: FeatureLabel) -> None:
    score = ""
    if label.detection is not None:
        d = label.detection
        score = f"  (F1 {d.f1:.2f} · precision {d.precision:.2f} · recall {d.recall:.2f})"
    print(f"  {_bold('label')}: {label.text or '(none)'}" + _dim(score))
    if label.explanation:
        print(f"  {_bold('explanation')}: {label.explanation}")
    where = [
        " · ".join(f"{k} {v:.0%}" for k, v in sorted(m.items(), key=lambda kv: -kv[1])[:3])
        for m in (label.scripts, label.languages)
        if m
    ]
    if where:
        print(_dim(f"  fires in: {' | '.join(where)}"))


_BLOCKS = " ▁▂▃▄▅▆▇█"


def histogram_summary(h: Histogram) -> str:
    """Firings, the range of values, and a sparkline of the counts (log-scaled)."""
    total = h.total
    if not total or len(h.edges) < 2:
        return "never fired in the catalog"
    logs = [math.log1p(c) for c in h.counts]
    top = max(logs) or 1.0
    spark = "".join(_BLOCKS[round(v / top * (len(_BLOCKS) - 1))] for v in logs)
    return f"{total} firings · {h.edges[0]:.2f} {spark} {h.edges[-1]:.2f}+"


# ---- listing and search -------------------------------------------------------------------
def feature_page(result: FeaturePage) -> None:
    rows = [
        [
            f.feature,
            f"{f.density:.3%}",
            f"{f.max_value:.2f}",
            "-" if f.label_f1 is None else f"{f.label_f1:.2f}",
            f.label or "-",
        ]
        for f in result.features
    ]
    if rows:
        _table(["feature", "density", "max", "F1", "label"], rows)
    else:
        print("  (no feature passes the filters)")
    print(_dim(f"{len(result.features)} of {result.total} features · SAE {result.sae_id}"))
    if result.next_page_token:
        print(_dim(f"more: --page-token {result.next_page_token} (or --all)"))


def search(result: FeatureSearch) -> None:
    def opt(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    rows = [
        [
            h.feature,
            f"{h.score:.4f}",
            h.matched,
            opt(h.text_score),
            opt(h.activation_score),
            "-" if h.density is None else f"{h.density:.3%}",
            h.label or "-",
        ]
        for h in result.hits
    ]
    if rows:
        _table(["feature", "score", "matched", "text", "activation", "density", "label"], rows)
    else:
        print("  (no feature matched)")
    if not result.has_catalog:
        print(_dim(f"SAE {result.sae_id} has no catalog: activation matches only"))


# ---- attribution --------------------------------------------------------------------------
def attribution(result: Attribution) -> None:
    target = result.target
    print(
        _bold(f"target {show(target.text)}")
        + f" (id {target.id}) · log p {result.target_logprob:.3f} · SAE {result.sae_id}"
    )
    if _colour():  # where the listed features act: Σ |attribution| per token
        weight = [
            sum(abs(f.per_token[i]) for f in result.features) for i in range(len(result.read))
        ]
        print("  " + _highlighted(result.prompt_tokens, weight))
    rows = []
    for f in result.features:
        peak = max(range(len(f.per_token)), key=lambda i: abs(f.per_token[i]), default=-1)
        where = (
            f"{show(result.prompt_tokens[peak].text)} {f.per_token[peak]:+.3f}"
            if peak >= 0
            else "-"
        )
        rows.append([f.feature, f"{f.attribution:+.3f}", f"{f.max_value:.2f}", where])
    if rows:
        _table(["feature", "attribution", "max value", "strongest at"], rows)
    else:
        print("  (no feature moved it)")
    print(
        f"  {_bold('nodes')}: features {result.features_total:+.3f} · error {result.error:+.3f}"
        f" · bias {result.bias:+.3f} · skipped {result.skipped:+.3f} = total {result.total:+.3f}"
    )
    print(
        _dim(
            "  attribution = activation × gradient of log p(target): removing a part (ablating"
            " a feature) moves log p by about −attribution, to first order"
        )
    )
