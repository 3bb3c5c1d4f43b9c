"""What every benchmark shares: the machine's description, results files, statistics, prompts.

A result file (``bench/results/<name>.json``) holds::

    {"name": ..., "title": ..., "machine": {...}, "params": {...},
     "caption": "...",                             # optional heading of the table below
     "rows": [{column: value, ...}, ...],          # the table BENCHMARKS.md shows
     "tables": {heading: rows, ...},               # further tables, if any
     "targets": [{"metric", "value", "target", "op", "met", "note"}, ...],
     "series": {...}}                               # raw numbers the plots are drawn from

Numbers are medians of repeated runs; every ratio compares a candidate with a baseline measured
in the same process and the same rounds, interleaved (the machine is shared and noisy).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import re
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_CORPUS = Path("~/.cache/saescope/corpus/default-v1/heldout.jsonl").expanduser()
TRAIN_CORPUS = Path("~/.cache/saescope/corpus/default-v1/train.jsonl").expanduser()
DEFAULT_HOOKPOINT = "model.layers.15"
T = TypeVar("T")

# Used only when the default corpus is not on this machine (the smoke test in CI).
FALLBACK_TEXTS = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)",
    "Die Katze schläft auf dem Sofa, während draußen der Regen fällt.",
    "Il existe heureusement des outils permettant d'automatiser une partie des opérations.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "El tren salió de la estación a las doce en punto.",
    "Rust's borrow checker enforces that references never outlive the data they point to.",
    "Le chat dort sur le canapé pendant que la pluie tombe dehors.",
)


# ---- the machine and the run ---------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    """nproc, CPU model, RAM, load, library versions, commit and date."""
    import torch

    cpu = "unknown"
    mem_gib = 0.0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gib = int(line.split()[1]) / 2**20
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "ram_gib": round(mem_gib, 1),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "commit": git_commit(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def git_commit() -> str:
    """``git rev-parse --short HEAD``, with ``+dirty`` when the tree has changes."""

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
        return out.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def set_threads(n: int) -> None:
    """Intra-op threads of torch in this process (and of BLAS/OpenMP it starts later)."""
    import torch

    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    torch.set_num_threads(n)


def sync(device: Any) -> None:
    """Wait for queued GPU work (before reading a clock); nothing on a CPU."""
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def base_parser(description: str) -> argparse.ArgumentParser:
    """Flags every benchmark takes: ``--quick``, ``--out``, ``--threads``, ``--rounds``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny sizes, one round")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="where results are written")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for the baseline and the candidate alike (default 1: on a shared "
        "2-core machine more threads than free cores make every op wait on a busy core)",
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where the service, the baselines and the trainers run (cuda: one GPU)",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="the model's weights in the service and the serving baselines (SAEs and training "
        "stay float32); bfloat16 on a GPU",
    )
    p.add_argument("--rounds", type=int, default=None, help="repetitions (default per script)")
    p.add_argument("--no-report", action="store_true", help="do not refresh BENCHMARKS.md")
    return p


# ---- statistics ----------------------------------------------------------------------------------
def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def percentile(xs: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0–100) by linear interpolation."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100
    lo, hi = int(pos), min(int(pos) + 1, len(s) - 1)
    return float(s[lo] + (s[hi] - s[lo]) * (pos - lo))


def rotate(items: Sequence[T], round_index: int) -> list[T]:
    """``items`` started at ``round_index``: interleaved rounds change who runs first."""
    k = round_index % len(items) if items else 0
    return [*items[k:], *items[:k]]


def wait_for_quiet(max_wait_s: float = 60.0, log: Callable[[str], None] = print) -> float:
    """Wait (at most ``max_wait_s``) while the 1-minute load average exceeds 2 × nproc: other
    people's jobs on a shared machine come and go. Returns the load average when done."""
    limit = 2 * (os.cpu_count() or 1)
    deadline = time.monotonic() + max_wait_s
    load = os.getloadavg()[0]
    if load > limit:
        log(f"  load average {load:.1f} > {limit}: waiting up to {max_wait_s:.0f} s")
    while load > limit and time.monotonic() < deadline:
        time.sleep(5)
        load = os.getloadavg()[0]
    return load


def interleave(
    cases: Mapping[str, Callable[[], float]], rounds: int, log: Callable[[str], None] = print
) -> dict[str, list[float]]:
    """Run every case once per round (rotating the order); each returns one measurement.

    Each round starts once the machine is not overloaded (``wait_for_quiet``)."""
    out: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(rounds):
        wait_for_quiet(log=log)
        for name in rotate(list(cases), r):
            value = cases[name]()
            out[name].append(value)
            log(f"  round {r + 1}/{rounds} {name}: {value:.4g}")
    return out


# ---- targets and results -------------------------------------------------------------------------
@dataclass
class Target:
    """A measured value against its target; ``op`` says which side meets it."""

    metric: str
    value: float
    target: float
    op: Literal[">=", "<="]
    note: str = ""

    @property
    def met(self) -> bool:
        return self.value >= self.target if self.op == ">=" else self.value <= self.target

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"met": self.met}


def write_result(
    out_dir: Path,
    name: str,
    *,
    title: str,
    params: dict[str, Any],
    rows: list[dict[str, Any]],
    targets: Sequence[Target] = (),
    series: dict[str, Any] | None = None,
    machine: dict[str, Any] | None = None,
    tables: dict[str, list[dict[str, Any]]] | None = None,
    caption: str = "",
) -> Path:
    """Write ``<out_dir>/<name>.json`` (see the module docstring)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "name": name,
        "title": title,
        "machine": machine or machine_info(),
        "params": params,
        "caption": caption,
        "rows": rows,
        "tables": tables or {},
        "targets": [t.to_json() for t in targets],
        "series": series or {},
    }
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1, default=_jsonable) + "\n")
    print(f"wrote {path}")
    for t in targets:
        verdict = "met" if t.met else "MISSED"
        print(f"  {t.metric}: {t.value:.3g} (target {t.op} {t.target:g}) {verdict}")
    return path


def _jsonable(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON-able: {type(x).__name__}")


def finish(args: argparse.Namespace) -> None:
    """After a script wrote its result: refresh BENCHMARKS.md and the plots (default results)."""
    if args.no_report or args.out.resolve() != RESULTS_DIR:
        return
    from bench import report

    report.main([])


def write_run(
    args: argparse.Namespace,
    name: str,
    res: Mapping[str, Any],
    *,
    title: str,
    threads_key: str = "threads",
) -> Path:
    """``write_result`` of what a bench's ``run`` returned (``params``, ``rows``, ``series`` and
    optional ``targets``) into ``args.out``, with ``args.threads`` added to the params as
    ``threads_key``."""
    return write_result(
        args.out,
        name,
        title=title,
        params=res["params"] | {threads_key: args.threads} | _placement(args),
        rows=res["rows"],
        targets=res.get("targets", ()),
        series=res["series"],
    )


def _placement(args: argparse.Namespace) -> dict[str, str]:
    """Where it ran, for the record: the device, and the dtype when it is not float32."""
    out = {"device": getattr(args, "device", "cpu")}
    if getattr(args, "dtype", "float32") != "float32":
        out["dtype"] = args.dtype
    return out


def bench_main(
    parser: argparse.ArgumentParser,
    argv: list[str] | None,
    measure: Callable[[argparse.Namespace], None],
) -> None:
    """A bench's command line: parse ``argv``, set the torch threads, ``measure`` (which writes
    the result), then refresh the report (``finish``)."""
    args = parser.parse_args(argv)
    set_threads(args.threads)
    measure(args)
    finish(args)


# ---- prompts from the default corpus ------------------------------------------------------------
def documents(path: Path = DEFAULT_CORPUS) -> list[str]:
    """The corpus's documents (real text in several languages + code), in file order."""
    if not path.is_file():
        return list(FALLBACK_TEXTS)
    with path.open() as f:
        return [json.loads(line)["text"] for line in f]


def corpus_texts(path: Path = DEFAULT_CORPUS, *, min_chars: int = 200) -> list[str]:
    """Paragraph-sized pieces of the corpus's documents."""
    texts = [
        p.strip()
        for doc in documents(path)
        for p in doc.split("\n\n")
        if len(p.strip()) >= min_chars
    ]
    return texts or list(FALLBACK_TEXTS)


def make_prompts(
    tokenizer: Any,
    n: int,
    *,
    min_tokens: int,
    max_tokens: int,
    seed: int = 0,
    path: Path = DEFAULT_CORPUS,
) -> list[str]:
    """``n`` prompts from the corpus, each cut at a token boundary to a random length in
    ``[min_tokens, max_tokens]`` tokens (texts shorter than that are used whole)."""
    rng = random.Random(seed)
    texts = corpus_texts(path)
    rng.shuffle(texts)
    prompts: list[str] = []
    for text in texts * (n // max(len(texts), 1) + 1):
        if len(prompts) == n:
            break
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        want = rng.randint(min_tokens, max_tokens)
        cut = text if len(offsets) <= want else text[: offsets[want - 1][1]]
        if cut.strip():
            prompts.append(cut)
    return prompts


# ---- a random SAE (speed does not depend on training) --------------------------------------------
def build_random_sae(
    out_dir: Path,
    *,
    model: str,
    hookpoint: str,
    d_in: int,
    d_sae: int,
    architecture: Literal["relu", "topk"] = "relu",
    k: int | None = None,
    seed: int = 0,
) -> Path:
    """An exported (model-units) SAE checkpoint with random weights, at ``out_dir``."""
    import torch

    from saescope.training import checkpoint
    from saescope.training.sae import SAE, SAEConfig

    sae = SAE(SAEConfig(d_in, d_sae, architecture, k))
    sae.init_weights(torch.Generator().manual_seed(seed))
    meta = checkpoint.CheckpointMeta(model=model, hookpoint=hookpoint, sae=sae.cfg)
    return checkpoint.save_checkpoint(out_dir, sae.export(1.0), meta)


def write_doc_block(
    doc: Path, name: str, body: str, machine: Mapping[str, Any], params: Mapping[str, Any]
) -> None:
    """Replace the block between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` in ``doc``
    (appended when ``doc`` has none) with a line naming the machine, the commit and ``params``,
    then ``body``; the rest of the page is written by hand."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    head = (
        f"_{machine['date']}, commit `{machine['commit']}`, {machine['cpu']}, "
        f"{machine['nproc']} cores; " + ", ".join(f"{k} = {v}" for k, v in params.items()) + "._"
    )
    block = f"{begin}\n{head}\n\n{body}\n{end}"
    text = doc.read_text() if doc.is_file() else ""
    if begin not in text:
        text = text + ("\n" if text else "") + f"{begin}\n{end}\n"
    pattern = re.escape(begin) + ".*?" + re.escape(end)
    doc.write_text(re.sub(pattern, lambda _: block, text, flags=re.S))
    print(f"wrote {doc}")
