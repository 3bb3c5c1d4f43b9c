"""A real local Ray Serve instance with the saescope app, for tests that go over the network.

The session fixture ``serve_instance`` (``tests/conftest.py``) calls :func:`start_serve` once per
test session. It builds the tiny random Llama of ``tests/service/engine_fixtures.py`` (width 64,
the SmolLM2 tokenizer) and two SAEs for it — ``tiny-relu`` at ``model.layers.1`` (the default)
and ``tiny-topk`` at ``model.layers.2`` — starts Ray locally (light: no dashboard, 8 logical
CPUs, metrics reported every second), Serve with its gRPC proxy and its HTTP proxy on free ports
(never 9000/8000), deploys the app as ``saescope`` with small limits (``TEST_LIMITS``) and waits
until a GetInfo call over gRPC succeeds. Use it like this::

    def test_something(serve_instance):
        stub = serve_instance.stub()
        info = stub.GetInfo(pb.GetInfoRequest(), metadata=serve_instance.metadata)

What the fixture's object offers (:class:`ServeInstance`):

- ``grpc_target`` (``"127.0.0.1:PORT"``), ``http_url`` (``"http://127.0.0.1:PORT"``, serves
  ``/-/healthz``), ``metrics_export_port`` (Ray's Prometheus endpoint:
  ``http://127.0.0.1:PORT/metrics``; series appear a few seconds after they are recorded);
- ``app_name``, ``metadata`` (send it with every call: ``application: saescope`` routes the
  call when a test has deployed a second app); ``sae_ids``, ``default_sae_id``, ``model_dir``,
  ``sae_paths``, ``app_args`` (what ``build_app`` received);
- ``channel()`` / ``stub()``; ``handle()``, a ``DeploymentHandle`` to the replica
  (``handle().stats.remote().result()``: ``open_streams``, ``active_rows``, ``pending`` and
  ``decode_steps`` — the decode batcher's rows and steps, to see that generation stopped);
- ``deploy_app(name, **overrides)``, a context manager that deploys a second app with changed
  arguments (e.g. ``api_key_env``, ``max_queued_requests``) and deletes it afterwards.

The API key for such apps is in the environment of every Ray worker as ``TEST_API_KEY_ENV``.
Set ``SAESCOPE_TEST_RAY_LOGS=1`` to see the replicas' and proxies' logs in the test output.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from saescope.api.v1 import saescope_pb2 as pb
from saescope.api.v1 import saescope_pb2_grpc as pb_grpc

APP_NAME = "saescope"
SERVICER = "saescope.api.v1.saescope_pb2_grpc.add_SaeScopeServicer_to_server"
# grpc_options.grpc_servicer_functions: the servicer, then the proxy patch that makes a
# client's cancellation of a stream reach the replica (saescope/service/proxy_patch.py).
SERVICER_FUNCTIONS = [SERVICER, "saescope.service.proxy_patch.install"]
TEST_API_KEY_ENV = "SAESCOPE_TEST_API_KEY"
TEST_API_KEY = "test-key-0123456789"
RELU, TOPK = "tiny-relu", "tiny-topk"
HOOKPOINTS = {RELU: "model.layers.1", TOPK: "model.layers.2"}
# Small limits, so that OUT_OF_RANGE is cheap to reach.
TEST_LIMITS = {
    "max_prompts": 8,
    "max_tokens_per_prompt": 96,
    "max_top_k": 32,
    "max_new_tokens": 400,
    "max_features": 8,
    "max_contrast_prompts": 16,
}


@dataclass
class ServeInstance:
    """A running Serve instance with the saescope app (see the module docstring)."""

    grpc_target: str
    http_url: str
    metrics_export_port: int
    model_dir: Path
    sae_paths: dict[str, Path]
    app_args: dict[str, Any]
    app_name: str = APP_NAME
    default_sae_id: str = RELU
    _channels: list[grpc.Channel] = field(default_factory=list, repr=False)

    @property
    def sae_ids(self) -> list[str]:
        return list(self.sae_paths)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("application", self.app_name),)

    def channel(self) -> grpc.Channel:
        ch = grpc.insecure_channel(self.grpc_target)
        self._channels.append(ch)
        return ch

    def stub(self, channel: grpc.Channel | None = None) -> pb_grpc.SaeScopeStub:
        return pb_grpc.SaeScopeStub(channel or self.channel())

    def handle(self, app_name: str | None = None) -> Any:
        from ray import serve

        return serve.get_deployment_handle("SaeScope", app_name=app_name or self.app_name)

    @contextmanager
    def deploy_app(self, name: str, **overrides: Any) -> Iterator[tuple[tuple[str, str], ...]]:
        """Deploy a second app with ``overrides`` of the args; yields its call metadata."""
        from ray import serve

        from saescope.service.app import build_app

        serve.run(build_app(self.app_args | overrides), name=name, route_prefix=f"/{name}")
        metadata = (("application", name),)
        try:
            _wait_for_grpc(self.grpc_target, metadata, api_key=TEST_API_KEY)
            yield metadata
        finally:
            serve.delete(name)

    def close(self) -> None:
        for ch in self._channels:
            ch.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def non_loopback_address() -> str | None:
    """An address of this machine other than loopback (the proxy listens on all of them), to
    call the service as a remote caller would; None when the machine has none."""
    candidates = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s, contextlib.suppress(OSError):
        s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the interface
        candidates.append(s.getsockname()[0])
    with contextlib.suppress(OSError):
        candidates += socket.gethostbyname_ex(socket.gethostname())[2]
    return next((a for a in candidates if not ipaddress.ip_address(a).is_loopback), None)


def build_artifacts(root: Path) -> tuple[Path, dict[str, Path]]:
    """The tiny model and its two SAEs under ``root``."""
    from tests.service.engine_fixtures import build_tiny_model, build_tiny_sae

    model_dir = build_tiny_model(root / "model")
    saes = {
        RELU: build_tiny_sae(root / RELU, model_dir, HOOKPOINTS[RELU], "relu", d_sae=128),
        TOPK: build_tiny_sae(root / TOPK, model_dir, HOOKPOINTS[TOPK], "topk", d_sae=96, seed=1),
    }
    return model_dir, saes


def app_args(model_dir: Path, saes: dict[str, Path]) -> dict[str, Any]:
    return {
        "model": str(model_dir),
        "saes": [{"sae_id": k, "path": str(v)} for k, v in saes.items()],
        "default_sae_id": RELU,
        "device": "cpu",
        "num_cpus": 1,
        "torch_threads": 1,
        "max_batch_size": 8,
        "batch_wait_timeout_s": 0.01,
        "limits": TEST_LIMITS,
    }


@contextmanager
def start_serve(root: Path) -> Iterator[ServeInstance]:
    """Build the artifacts, start Ray + Serve + the app, yield, then shut everything down."""
    import ray
    from ray import serve

    from saescope.service import wire_limits
    from saescope.service.app import build_app

    # Build the model and SAEs while Ray and Serve start: both take seconds.
    building = ThreadPoolExecutor(1).submit(build_artifacts, root)
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", TEST_API_KEY_ENV: TEST_API_KEY}
    # Serve's controller gives a starting proxy 3 × 5 s to report ready, then kills it; on a
    # loaded 2-core machine its start (imports, the proxy patch) can take longer. The local
    # cluster's processes inherit this process's environment.
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    ray.init(
        address="local",
        num_cpus=8,
        include_dashboard=False,
        namespace="saescope-tests",
        log_to_driver=os.environ.get("SAESCOPE_TEST_RAY_LOGS") == "1",
        runtime_env={"env_vars": env},
        _metrics_export_port=metrics_port,
        _system_config={"metrics_report_interval_ms": 1000},  # metrics scrapable within ~2 s
    )
    try:
        serve.start(
            proxy_location="HeadOnly",
            http_options={"host": "127.0.0.1", "port": http_port},
            grpc_options={"port": grpc_port, "grpc_servicer_functions": SERVICER_FUNCTIONS},
            controller_options=wire_limits.controller_options(),  # 4 MiB messages, as served
        )
        model_dir, saes = building.result()
        args = app_args(model_dir, saes)
        serve.run(build_app(args), name=APP_NAME, route_prefix=f"/{APP_NAME}")
        inst = ServeInstance(
            grpc_target=f"127.0.0.1:{grpc_port}",
            http_url=f"http://127.0.0.1:{http_port}",
            metrics_export_port=metrics_port,
            model_dir=model_dir,
            sae_paths=saes,
            app_args=args,
        )
        _wait_for_grpc(inst.grpc_target, inst.metadata)
        _wait_for_http(f"{inst.http_url}/-/healthz")
        yield inst
        inst.close()
    finally:
        serve.shutdown()
        ray.shutdown()


def _wait_for_grpc(
    target: str, metadata: tuple[tuple[str, str], ...], *, api_key: str = "", timeout: float = 60
) -> None:
    """Until the proxy routes to the app (its route table lags ``serve.run`` by a moment)."""
    md = (*metadata, ("x-api-key", api_key)) if api_key else metadata
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as ch:
        stub = pb_grpc.SaeScopeStub(ch)
        while True:
            try:
                stub.GetInfo(pb.GetInfoRequest(), metadata=md, timeout=10)
                return
            except grpc.RpcError as e:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"saescope app not reachable over gRPC: {e}") from e
                time.sleep(0.2)


def _wait_for_http(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError as e:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} not healthy: {e}") from e
        time.sleep(0.2)
