"""Resident memory of the replica, and its growth over 10,000 calls.

The replica's PID comes from Ray's state API; its RSS is read from ``/proc`` after a warm-up,
then after every 1,000 calls. The calls mimic a busy service, 8 threads at a time: per 1,000,
400 ``GetFeatureActivations`` (a short corpus prompt; top features per token, chosen features'
values, aggregated top features), 450 ``Tokenize``, 145 ``GetInfo`` and 5 steered
``GenerateSteered`` of 4 tokens. For scale, the RSS of a bare Python process that loaded the
same model and SAE is measured too. Target: flat — RSS after the last block within 25 MiB of
RSS after the first block (growth from the warm-up to the first block is allocator and cache
warm-up).

    python -m bench.serve_memory
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bench import common
from bench.baseline import tokenizer_for
from bench.launcher import ServeSetup, replica_pid, rss_bytes, serve_main

NAME = "serve_memory"
MIB = 2**20
FLAT_MIB = 25.0
THREADS = 8

_BARE = """
import sys, torch
from pathlib import Path
torch.set_num_threads(1)
from saescope.training import checkpoint, models
lm, tok = models.load_model(sys.argv[1], device="cpu")
sae, _ = checkpoint.load_sae(Path(sys.argv[2]))
with torch.inference_mode():
    lm(**tok("warm up", return_tensors="pt"))
for line in open("/proc/self/status"):
    if line.startswith("VmRSS:"):
        print(int(line.split()[1]) * 1024)
"""


def bare_rss(setup: ServeSetup) -> int:
    """RSS of a fresh Python process holding the same model and SAE (after one forward)."""
    out = subprocess.run(
        [sys.executable, "-c", _BARE, setup.model, str(setup.sae_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.strip().splitlines()[-1])


def call_mix(client: Any, setup: ServeSetup, prompts: list[str], i: int) -> None:
    """Call number ``i`` of the mix (see the module docstring)."""
    from saescope.client import clamp

    slot = i % 200
    if slot < 80:
        client.activations(prompts[i % len(prompts)], sae_id=setup.sae_id, features=[1, 2, 3])
    elif slot < 170:
        client.tokenize(prompts[i % len(prompts)])
    elif slot < 199:
        client.info()
    else:
        client.generate(
            prompts[i % len(prompts)],
            sae_id=setup.sae_id,
            interventions=[clamp(7 + i % 50, 5.0)],
            max_new_tokens=4,
        )


def run(setup: ServeSetup, *, calls: int, every: int, bare: bool = True) -> dict[str, Any]:
    tok = tokenizer_for(setup.model)
    prompts = common.make_prompts(tok, 64, min_tokens=4, max_tokens=12, seed=11)
    pid = replica_pid(setup.application)
    clients = [setup.client() for _ in range(THREADS)]

    def block(start: int, end: int) -> None:
        """Calls ``start`` … ``end - 1``, ``THREADS`` at a time."""
        indices = iter(range(start, end))
        lock = threading.Lock()

        def worker(w: int) -> None:
            while True:
                with lock:
                    i = next(indices, None)
                if i is None:
                    return
                call_mix(clients[w], setup, prompts, i)

        with ThreadPoolExecutor(THREADS) as pool:
            list(pool.map(worker, range(THREADS)))

    block(0, 200)  # warm-up: every kind of call at least once
    points = [(0, rss_bytes(pid))]
    print(f"  replica pid {pid}: RSS {points[0][1] / MIB:.0f} MiB after warm-up")
    start = time.perf_counter()
    for done in range(every, calls + 1, every):
        block(done - every, done)
        points.append((done, rss_bytes(pid)))
        elapsed = time.perf_counter() - start
        print(f"  {done} calls: RSS {points[-1][1] / MIB:.0f} MiB ({elapsed:.0f} s)")
    for c in clients:
        c.close()
    first, last = points[1][1], points[-1][1]
    growth = (last - first) / MIB
    rows = [
        {"measure": "replica RSS after warm-up", "MiB": round(points[0][1] / MIB, 1)},
        {"measure": f"replica RSS after {every} calls", "MiB": round(first / MIB, 1)},
        {"measure": f"replica RSS after {calls} calls", "MiB": round(last / MIB, 1)},
        {
            "measure": f"growth from {every} to {calls} calls",
            "MiB": round(growth, 1),
        },
    ]
    if bare:
        mib = bare_rss(setup) / MIB
        rows.append({"measure": "bare Python process, same model + SAE", "MiB": round(mib, 1)})
    targets = [
        common.Target(
            f"RSS growth {every}→{calls} calls (MiB)",
            growth,
            FLAT_MIB,
            "<=",
            note="flat",
        )
    ]
    series = {"calls": [c for c, _ in points], "rss_mib": [r / MIB for _, r in points]}
    return {
        "params": {
            "calls": calls,
            "every": every,
            "threads": THREADS,
            "seconds": round(time.perf_counter() - start),
        },
        "rows": rows,
        "targets": targets,
        "series": series,
    }


def measure(setup: ServeSetup, args: argparse.Namespace) -> None:
    res = (
        run(setup, calls=400, every=200, bare=False)
        if args.quick
        else run(setup, calls=10_000, every=1000)
    )
    common.write_run(
        args,
        NAME,
        res,
        title="Replica memory (RSS) and its growth over many calls",
        threads_key="torch_threads",
    )


def main(argv: list[str] | None = None) -> None:
    serve_main(argv, __doc__ or "", measure)


if __name__ == "__main__":
    main()
