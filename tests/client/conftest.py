"""Fixtures of the client tests: SDK clients connected to the real ``serve_instance``, a
plain TCP relay that can bring a port up late (for the retry tests), and ``node`` for the Node.js
client's tests.

No mocks: every call goes over gRPC to the Ray Serve app on the tiny model.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from saescope.client import Client, Info
from tests.support.serve import ServeInstance

NODE_DIR = Path(__file__).resolve().parents[2] / "clients" / "node"


@pytest.fixture(scope="session")
def node() -> str:
    """The ``node`` executable; skips, saying why, without it or the client's dependencies."""
    exe = shutil.which("node")
    if exe is None:
        pytest.skip("node is not installed: the Node.js client cannot be tested here")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.skip(
            f"the Node.js client's dependencies are missing: run `npm install` in {NODE_DIR}"
        )
    return exe


@pytest.fixture(scope="session")
def connect(serve_instance: ServeInstance) -> dict[str, Any]:
    """Keyword arguments that connect a client to the test service."""
    return {"application": serve_instance.app_name, "timeout": 60.0}


@pytest.fixture(scope="session")
def client(serve_instance: ServeInstance, connect: dict[str, Any]) -> Iterator[Client]:
    with Client(serve_instance.grpc_target, **connect) as c:
        yield c


@pytest.fixture(scope="session")
def info(client: Client) -> Info:
    return client.info()


def server_stats(serve_instance: ServeInstance) -> dict[str, int]:
    """The replica's generation counters (``SaeScope.stats`` through a DeploymentHandle)."""
    stats = serve_instance.handle().stats.remote().result(timeout_s=30)
    return dict(stats)


def generation_in_flight(stats: dict[str, int]) -> int:
    """Streams open plus rows decoding or waiting: 0 once the server stopped all generation."""
    return sum(stats.get(k, 0) for k in ("open_streams", "active_rows", "pending"))


def generation_progress(stats: dict[str, int]) -> int:
    """Decode steps run since start: grows while anything is being generated."""
    return stats["decode_steps"]


def wait_until_idle(serve_instance: ServeInstance, timeout: float = 15) -> dict[str, int]:
    """Poll the counters until no generation is in flight (or ``timeout``); the last ones."""
    deadline = time.monotonic() + timeout
    while generation_in_flight(stats := server_stats(serve_instance)) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.1)
    assert generation_in_flight(stats) == 0, f"generation still running: {stats}"
    return stats


class TcpRelay:
    """Forwards TCP connections from a local port to ``upstream`` (``host:port``), starting
    whenever ``start()`` is called: a stand-in for a load balancer that comes back up. It
    relays bytes only; the service behind it is the real one."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()  # free until start(): connections are refused meanwhile
        self._server: socket.socket | None = None
        self._closed = threading.Event()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(16)
        self._server = server
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        assert self._server is not None
        while not self._closed.is_set():
            try:
                downstream, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            for a, b in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closed.set()
        if self._server is not None:
            self._server.close()


@pytest.fixture
def late_relay(serve_instance: ServeInstance) -> Iterator[TcpRelay]:
    """A relay to the service whose port opens only when the test calls ``start()``."""
    relay = TcpRelay(serve_instance.grpc_target)
    yield relay
    relay.close()
