"""How the reliability probe calls the service and judges an answer.

Every request goes over a plain gRPC channel as bytes (``unary_unary`` / ``unary_stream`` with no
serialisers), so a well-formed message and a hand-broken one travel the same way, through Ray
Serve's real proxy. An answer is judged on three things: its status code, whether its details
name what was wrong (the field, the limit, the header), and whether they leak internals — a
Python traceback, a source location, an actor or object id (20+ hex digits), ``pid=``, an IP
address, Ray's exception and actor names. DESIGN §6: never a traceback in ``details``.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import grpc
from google.protobuf.message import Message

SERVICE = "saescope.api.v1.SaeScope"
STREAMING = frozenset({"StreamGenerateSteered"})
RPCS = (
    "GetInfo",
    "Tokenize",
    "GetFeatureActivations",
    "GenerateSteered",
    "StreamGenerateSteered",
    "SearchFeaturesByContrast",
    "GetFeature",
    "AttributeFeatures",
)
Metadata = tuple[tuple[str, str], ...]

# What a caller must never see in ``details`` (name → pattern).
LEAKS: dict[str, re.Pattern[str]] = {
    "traceback": re.compile(r"Traceback"),
    "source location": re.compile(r'File "'),
    "hex id (20+ digits)": re.compile(r"\b[0-9a-fA-F]{20,}\b"),
    "pid": re.compile(r"\bpid=", re.IGNORECASE),
    "ip address": re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}\b"),
    "ray internals": re.compile(
        r"ray\.exceptions|RayActorError|ActorDiedError|ActorID|ServeReplica|SERVE_REPLICA|<class '"
    ),
}


@dataclass(frozen=True)
class Outcome:
    """What one call came back with."""

    code: grpc.StatusCode
    details: str
    seconds: float
    events: int = 0  # stream events (or 1 for a unary response) received before the end

    @property
    def code_name(self) -> str:
        return self.code.name


def leaks(details: str) -> list[str]:
    """Names of the internals ``details`` shows (empty: none)."""
    return [name for name, pattern in LEAKS.items() if pattern.search(details)]


def as_bytes(request: Message | bytes) -> bytes:
    return request if isinstance(request, bytes) else request.SerializeToString()


def call(
    channel: grpc.Channel,
    rpc: str,
    request: Message | bytes,
    metadata: Metadata,
    *,
    timeout: float = 60.0,
) -> Outcome:
    """Send ``request`` (a message or raw bytes) to ``rpc``; drain a stream; never raise."""
    path = f"/{SERVICE}/{rpc}"
    raw = as_bytes(request)
    start = time.perf_counter()
    events = 0
    try:
        if rpc in STREAMING:
            for _ in channel.unary_stream(path)(raw, metadata=metadata, timeout=timeout):
                events += 1
        else:
            channel.unary_unary(path)(raw, metadata=metadata, timeout=timeout)
            events = 1
    except grpc.RpcError as e:
        code = e.code() if isinstance(e, grpc.Call) else grpc.StatusCode.UNKNOWN
        details = (e.details() if isinstance(e, grpc.Call) else str(e)) or ""
        return Outcome(code, details, time.perf_counter() - start, events)
    return Outcome(grpc.StatusCode.OK, "", time.perf_counter() - start, events)


def names(details: str, needle: str | None, code: grpc.StatusCode) -> bool | None:
    """Whether ``details`` name ``needle`` (None where there is nothing to name).

    A field error from the app starts with the field (``prompts[1]: …``, DESIGN §6); anything
    else (NOT_FOUND, the proxy's and grpc's own messages) need only mention it.
    """
    if needle is None:
        return None
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE):
        return details.startswith(needle)
    return needle.lower() in details.lower()
