"""The service's Prometheus metrics, through ``ray.serve.metrics``.

Ray exports them on its metrics port with a ``ray_`` prefix (counters also get ``_total``),
with Serve's ``deployment``, ``replica`` and ``application`` tags added. The names below are
what the Kubernetes dashboards and alerts query; change them only together with ``k8s/``.

| name                               | type      | tags        |
|------------------------------------|-----------|-------------|
| saescope_requests                  | counter   | rpc, code   |
| saescope_request_latency_s         | histogram | rpc         |
| saescope_tokens_in                 | counter   | rpc         |
| saescope_tokens_out                | counter   | rpc         |
| saescope_time_to_first_token_s     | histogram |             |
| saescope_decode_tokens_per_s       | histogram |             |
| saescope_batch_size                | histogram | kind        |
| saescope_queue_wait_s              | histogram | kind        |
| saescope_sae_encode_s              | histogram | sae_id      |
| saescope_queue_depth               | gauge     | kind        |

``kind`` is ``forward`` (batched activation passes) or ``decode`` (batched generation steps).
``ServiceMetrics`` is also the engine's observer (``runtime.EngineObserver``): the decode thread
and the engine's worker threads record every decode step's rows, every generation's wait to join
the decode batch and every SAE encode's time (on CPU, or on GPU with ``metrics_sync_timing``).
Ray's metric objects may be recorded from any thread: the Python side only reads the metric's
default tags and builds a fresh tag dict per call, and Ray 2.60's C++ recorder (OpenTelemetry,
its default) takes a mutex around every registration and every recorded value (the older
OpenCensus path is thread-safe as well). Ray's own replica records from its user-code thread.
"""

from __future__ import annotations

from typing import Literal

from ray.serve.metrics import Counter, Gauge, Histogram

BatchKind = Literal["forward", "decode"]

_LATENCY_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5, 10, 30, 60, 120, 300]
_WAIT_S = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5, 10]
_ENCODE_S = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0]
_RATE = [1.0, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]
_BATCH = [1.0, 2, 4, 8, 16, 32, 64, 128, 256]


class ServiceMetrics:
    """Every metric of a replica, with one method per thing that happened."""

    def __init__(self) -> None:
        self._requests = Counter(
            "saescope_requests",
            description="Finished RPCs by method and gRPC status code.",
            tag_keys=("rpc", "code"),  # type: ignore[arg-type]  # Ray annotates tuple[str]
        )
        self._latency = Histogram(
            "saescope_request_latency_s",
            description="Time from a request's arrival at the replica to its last byte (s).",
            boundaries=_LATENCY_S,
            tag_keys=("rpc",),
        )
        self._tokens_in = Counter(
            "saescope_tokens_in",
            description="Prompt tokens processed, by RPC.",
            tag_keys=("rpc",),
        )
        self._tokens_out = Counter(
            "saescope_tokens_out",
            description="Tokens generated, by RPC (steered and baseline branches).",
            tag_keys=("rpc",),
        )
        self._ttft = Histogram(
            "saescope_time_to_first_token_s",
            description="Time from a generation's arrival to its first generated token (s).",
            boundaries=_LATENCY_S,
        )
        self._decode_rate = Histogram(
            "saescope_decode_tokens_per_s",
            description="Generated tokens per second of one generation, after its first token.",
            boundaries=_RATE,
        )
        self._batch_size = Histogram(
            "saescope_batch_size",
            description="Rows per batched forward pass or decode step.",
            boundaries=_BATCH,
            tag_keys=("kind",),
        )
        self._queue_wait = Histogram(
            "saescope_queue_wait_s",
            description="Time a request waited for its batch to start (s).",
            boundaries=_WAIT_S,
            tag_keys=("kind",),
        )
        self._sae_encode = Histogram(
            "saescope_sae_encode_s",
            description="Time to encode one batch with an SAE (s).",
            boundaries=_ENCODE_S,
            tag_keys=("sae_id",),
        )
        self._queue_depth = Gauge(
            "saescope_queue_depth",
            description="Requests waiting for a batch in this replica.",
            tag_keys=("kind",),
        )

    # ---- requests ----
    def request_done(self, rpc: str, code: str, latency_s: float) -> None:
        self._requests.inc(tags={"rpc": rpc, "code": code})
        self._latency.observe(latency_s, tags={"rpc": rpc})

    def tokens(self, rpc: str, *, tokens_in: int = 0, tokens_out: int = 0) -> None:
        if tokens_in:
            self._tokens_in.inc(tokens_in, tags={"rpc": rpc})
        if tokens_out:
            self._tokens_out.inc(tokens_out, tags={"rpc": rpc})

    # ---- generation ----
    def first_token(self, seconds: float) -> None:
        self._ttft.observe(seconds)

    def decode_rate(self, tokens: int, seconds: float) -> None:
        """A finished generation's decode speed: tokens after the first over their time."""
        if tokens > 0 and seconds > 0:
            self._decode_rate.observe(tokens / seconds)

    # ---- batching ----
    def batch(self, kind: BatchKind, size: int, waits_s: list[float]) -> None:
        """One batch of ``size`` rows ran; ``waits_s`` are its requests' queue waits."""
        self._batch_size.observe(size, tags={"kind": kind})
        for wait in waits_s:
            self._queue_wait.observe(max(wait, 0.0), tags={"kind": kind})

    def queue_depth(self, kind: BatchKind, depth: int) -> None:
        self._queue_depth.set(depth, tags={"kind": kind})

    # ---- the engine's observer (runtime.EngineObserver): called from engine threads ----
    def on_sae_encode(self, sae_id: str, seconds: float) -> None:
        self._sae_encode.observe(seconds, tags={"sae_id": sae_id})

    def on_decode_step(self, rows: int, seconds: float) -> None:
        self._batch_size.observe(rows, tags={"kind": "decode"})

    def on_admit(self, wait_seconds: float) -> None:
        self._queue_wait.observe(max(wait_seconds, 0.0), tags={"kind": "decode"})
