"""A local Ray Serve instance with the saescope app on the default model, for the serving benches.

It starts Ray, Serve with its gRPC proxy, and the app exactly as the tests do
(``tests/support/serve.py``: the same servicer path, free ports, the same readiness waits, which
this module imports from there), but with any app arguments: by default SmolLM2-135M-Instruct
and one random SAE of 4096 features at ``model.layers.15`` (speed does not depend on training).

A serving bench takes a :class:`ServeSetup`, so it runs the same against this launcher
(``python -m bench.serve_activations``, through :func:`serve_main`) and against the tests' tiny
instance (the smoke test).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import DEFAULT_HOOKPOINT, base_parser, bench_main, build_random_sae
from saescope.service import wire_limits
from tests.support.serve import SERVICER_FUNCTIONS, _wait_for_grpc, _wait_for_http, free_port

APP_NAME = "saescope"
BENCH_SAE_ID = "bench-l15-relu-4096"
# Large enough for every bench's calls (128 prompts in one GetFeatureActivations call, …).
BENCH_LIMITS = {
    "max_prompts": 128,
    "max_tokens_per_prompt": 1024,
    "max_top_k": 256,
    "max_new_tokens": 512,
    "max_features": 64,
    "max_contrast_prompts": 128,
}


@dataclass(frozen=True)
class ServeSetup:
    """What a serving bench needs: where the service is, and what it serves."""

    grpc_target: str
    application: str
    model: str  # "default" or a model directory (the in-process baseline loads the same)
    sae_id: str
    sae_path: Path
    device: str = "cpu"  # where the service runs; the in-process baselines run there too
    dtype: str = "float32"  # the model's weights, in the service and the baselines
    http_url: str = ""  # Serve's HTTP proxy (the web explorer under /{application}/)

    def client(self) -> Any:
        from saescope.client import Client

        return Client(self.grpc_target, application=self.application, timeout=600, retry=0)


def app_args(
    sae_path: Path,
    *,
    torch_threads: int,
    model: str = "default",
    device: str = "cpu",
    dtype: str = "float32",
) -> dict[str, Any]:
    """The bench app: one replica with ``torch_threads`` threads and BENCH_LIMITS, on the CPU or
    on one GPU (``device="cuda"``)."""
    return {
        "model": model,
        "saes": [{"sae_id": BENCH_SAE_ID, "path": str(sae_path)}],
        "device": device,
        "dtype": dtype,
        "num_gpus": 1 if device == "cuda" else 0,
        "num_cpus": 1,
        "torch_threads": torch_threads,
        "limits": BENCH_LIMITS,
    }


@contextmanager
def serve_default(
    *, torch_threads: int = 1, device: str = "cpu", dtype: str = "float32"
) -> Iterator[ServeSetup]:
    """The default model and a random SAE at layer 15, served locally."""
    with tempfile.TemporaryDirectory(prefix="saescope-bench-") as tmp:
        sae = build_random_sae(
            Path(tmp) / "sae",
            model="default",
            hookpoint=DEFAULT_HOOKPOINT,
            d_in=576,
            d_sae=4096,
        )
        args = app_args(sae, torch_threads=torch_threads, device=device, dtype=dtype)
        with start_app(args) as (target, http_url):
            yield ServeSetup(
                target, APP_NAME, "default", BENCH_SAE_ID, sae, device, dtype, http_url
            )


def serve_main(
    argv: list[str] | None,
    description: str,
    measure: Callable[[ServeSetup, argparse.Namespace], None],
) -> None:
    """A serving bench's command line: the common flags, then ``measure`` against the default
    model and a random SAE served locally (``serve_default``), then the report refreshed."""

    def served(args: argparse.Namespace) -> None:
        with serve_default(
            torch_threads=args.threads, device=args.device, dtype=args.dtype
        ) as setup:
            measure(setup, args)

    bench_main(base_parser(description), argv, served)


@contextmanager
def start_app(args: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """Ray + Serve (gRPC and HTTP proxies on free ports) + the app with ``args``; yields the
    gRPC target and the HTTP proxy's address."""
    import ray
    from ray import serve

    from saescope.service.app import build_app

    grpc_port, http_port = free_port(), free_port()
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    ray.init(
        address="local",
        num_cpus=8,
        include_dashboard=False,
        namespace="saescope-bench",
        log_to_driver=os.environ.get("SAESCOPE_BENCH_RAY_LOGS") == "1",
        runtime_env={"env_vars": env},
    )
    try:
        serve.start(
            proxy_location="HeadOnly",
            http_options={"host": "127.0.0.1", "port": http_port},
            grpc_options={"port": grpc_port, "grpc_servicer_functions": SERVICER_FUNCTIONS},
            controller_options=wire_limits.controller_options(),  # 4 MiB messages, as deployed
        )
        serve.run(build_app(args), name=APP_NAME, route_prefix=f"/{APP_NAME}")
        target = f"127.0.0.1:{grpc_port}"
        _wait_for_grpc(target, (("application", APP_NAME),), timeout=300)
        _wait_for_http(f"http://127.0.0.1:{http_port}/-/healthz")
        yield target, f"http://127.0.0.1:{http_port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def replica_pid(app_name: str = APP_NAME) -> int:
    """PID of the (one) live replica of the app's SaeScope deployment, from Ray's actor table.

    Ray's public state API (``ray.util.state.list_actors``) needs the dashboard, which these
    instances run without; the GCS actor table behind it answers the same question.
    """
    from ray._private import state

    want = f"ServeReplica:{app_name}:SaeScope"
    table = state.actors(actor_state_name="ALIVE")
    pids = [int(a["Pid"]) for a in table.values() if a["ActorClassName"] == want]
    if len(pids) != 1:
        raise RuntimeError(f"expected one live {want} actor, found PIDs {pids}")
    return pids[0]


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux ``/proc/<pid>/status``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")
