"""A replica killed under a call: the caller gets UNAVAILABLE — the status to retry — without
Ray's internals (actor ids, pids), and the SDK's retries carry a call through the restart.

A separate app (``saescope-kill``) is deployed so the shared one is not disturbed; its replica
actor is killed with ``ray.kill`` from this process (the fixture's Ray driver) while a stream
is decoding, and again while a unary generation is.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from saescope.api.v1 import saescope_pb2 as pb
from saescope.client import Client, RetryPolicy
from tests.support.serve import TEST_LIMITS, ServeInstance

APP = "saescope-kill"
LONG = pb.GenerateSteeredRequest(
    prompt=pb.Prompt(text="Hello"),
    sampling=pb.SamplingParams(max_new_tokens=TEST_LIMITS["max_new_tokens"]),
)
# Enough patience for Serve to notice the death and start a replica (seconds on a laptop).
PATIENT = RetryPolicy(max_attempts=30, initial_backoff=0.5, max_backoff=2.0)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def app(serve_instance: ServeInstance) -> Iterator[tuple[tuple[str, str], ...]]:
    with serve_instance.deploy_app(APP) as metadata:
        yield metadata


def kill_replica() -> None:
    """Kill the app's replica actor, as the OOM killer or a lost node would."""
    import ray

    prefix = f"SERVE_REPLICA::{APP}#"
    names = [a for a in ray.util.list_named_actors(all_namespaces=True)]
    (replica,) = [a for a in names if a["name"].startswith(prefix)]
    ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)


def wait_until_decoding(serve_instance: ServeInstance) -> None:
    stats = serve_instance.handle(APP).stats
    deadline = time.monotonic() + 30
    while not stats.remote().result(timeout_s=30)["active_rows"]:
        assert time.monotonic() < deadline, "the generation never started"
        time.sleep(0.05)


def assert_public(err: grpc.RpcError) -> None:
    details = err.details() or ""
    assert err.code() == grpc.StatusCode.UNAVAILABLE, (err.code(), details)
    assert "retry" in details
    for internal in ("actor", "pid", "ServeReplica", "Traceback", "ip="):
        assert internal not in details, details


def recovered(serve_instance: ServeInstance) -> Any:
    with Client(serve_instance.grpc_target, application=APP, retry=PATIENT, timeout=120) as c:
        return c.info()


def test_a_replica_killed_mid_stream_gives_unavailable(
    serve_instance: ServeInstance, app: tuple[tuple[str, str], ...]
) -> None:
    stream = serve_instance.stub().StreamGenerateSteered(LONG, metadata=app, timeout=120)
    next(stream)  # the first token arrived: the replica is decoding this call
    kill_replica()
    with pytest.raises(grpc.RpcError) as info:
        for _ in stream:
            pass
    assert_public(info.value)
    assert recovered(serve_instance).saes  # a new replica serves the app


def test_the_sdk_retries_a_call_whose_replica_was_killed(
    serve_instance: ServeInstance, app: tuple[tuple[str, str], ...]
) -> None:
    recovered(serve_instance)  # a replica is up (after the previous test's kill)
    result: dict[str, Any] = {}

    def generate() -> None:
        with Client(serve_instance.grpc_target, application=APP, retry=PATIENT, timeout=120) as c:
            try:
                result["text"] = c.generate("Hello", max_new_tokens=40, seed=0).text
            except Exception as e:  # reported below
                result["error"] = e

    caller = threading.Thread(target=generate)
    caller.start()
    wait_until_decoding(serve_instance)
    kill_replica()
    caller.join(timeout=150)
    assert "error" not in result, result
    assert isinstance(result.get("text"), str)
