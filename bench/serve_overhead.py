"""Per-call overhead of the gRPC + Ray Serve path on trivial calls: latency p50 and p99.

``GetInfo`` and ``Tokenize`` of a short text, one call at a time, through the SDK and through
the bare generated stub (the difference is the SDK's own cost). Two references: Ray Serve's
own floor — ``GetInfo`` of a second app on the same proxy whose deployment returns an empty
response at once — and the in-process work of a Tokenize call (the tokenizer on the same
text). Cases run in interleaved blocks of 50 calls.

    python -m bench.serve_overhead
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc

from bench import common
from bench.baseline import tokenizer_for
from bench.launcher import ServeSetup, serve_main
from saescope.api.v1 import saescope_pb2 as pb
from saescope.api.v1 import saescope_pb2_grpc as pb_grpc
from tests.support.serve import _wait_for_grpc

NAME = "serve_overhead"
NOOP_APP = "saescope-bench-noop"
TEXT = "The Eiffel Tower is in Paris."
BLOCK = 50


@contextmanager
def noop_app(name: str = NOOP_APP) -> Iterator[tuple[tuple[str, str], ...]]:
    """A second Serve app on the same gRPC proxy whose GetInfo does nothing; yields its
    call metadata. Deleted afterwards."""
    from ray import serve

    # Defined here so that Ray pickles it by value: replicas need not import ``bench``.
    @serve.deployment(name="Noop", ray_actor_options={"num_cpus": 0})
    class Noop:
        async def GetInfo(
            self, request: pb.GetInfoRequest, grpc_context: Any = None
        ) -> pb.GetInfoResponse:
            return pb.GetInfoResponse()

    serve.run(Noop.bind(), name=name, route_prefix=f"/{name}")  # type: ignore[attr-defined]
    try:
        yield (("application", name),)
    finally:
        serve.delete(name)


def run(setup: ServeSetup, *, calls: int) -> dict[str, Any]:
    with noop_app() as noop_md:
        return _run(setup, calls, noop_md)


def _run(setup: ServeSetup, calls: int, noop_md: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    tok = tokenizer_for(setup.model)
    client = setup.client()
    channel = grpc.insecure_channel(setup.grpc_target)
    stub = pb_grpc.SaeScopeStub(channel)
    md = (("application", setup.application),)
    tokenize_req = pb.TokenizeRequest(prompt=pb.Prompt(text=TEXT))
    _wait_for_grpc(setup.grpc_target, noop_md)

    ops: dict[str, Callable[[], Any]] = {
        "GetInfo (SDK)": client.info,
        "GetInfo (bare stub)": lambda: stub.GetInfo(pb.GetInfoRequest(), metadata=md),
        "Tokenize (SDK)": lambda: client.tokenize(TEXT),
        "Tokenize (bare stub)": lambda: stub.Tokenize(tokenize_req, metadata=md),
        "Serve floor: no-op GetInfo (bare stub)": lambda: stub.GetInfo(
            pb.GetInfoRequest(), metadata=noop_md
        ),
        "tokenizer in process": lambda: tok(TEXT, return_offsets_mapping=True),
    }
    for op in ops.values():  # warm up
        for _ in range(5):
            op()
    latencies: dict[str, list[float]] = {name: [] for name in ops}
    for r in range(max(1, calls // BLOCK)):
        for name in common.rotate(list(ops), r):
            op = ops[name]
            for _ in range(min(BLOCK, calls)):
                t = time.perf_counter()
                op()
                latencies[name].append(time.perf_counter() - t)
    client.close()
    channel.close()
    rows = [
        {
            "call": name,
            "calls": len(xs),
            "p50 ms": round(1e3 * common.percentile(xs, 50), 3),
            "p99 ms": round(1e3 * common.percentile(xs, 99), 3),
            "mean ms": round(1e3 * sum(xs) / len(xs), 3),
        }
        for name, xs in latencies.items()
    ]
    return {"params": {"calls": calls, "text": TEXT}, "rows": rows, "series": latencies}


def measure(setup: ServeSetup, args: argparse.Namespace) -> None:
    res = run(setup, calls=50 if args.quick else 500)
    common.write_run(args, NAME, res, title="Per-call overhead of the gRPC + Ray Serve path")


def main(argv: list[str] | None = None) -> None:
    serve_main(argv, __doc__ or "", measure)


if __name__ == "__main__":
    main()
