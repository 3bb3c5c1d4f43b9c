"""The standard gRPC health service (``grpc.health.v1.Health``), answered by Serve's gRPC proxy.

Load balancers, Kubernetes' ``grpc`` probes and ``grpc-health-probe`` speak this protocol. It is
served by the proxy itself — registered as a passthrough service, so Serve does not route it to
a replica — and therefore never waits behind model work. Statuses:

- ``""`` (the server): SERVING while the proxy takes traffic — not draining, and its route table
  is populated (what Serve's own ``/-/healthz`` reports); NOT_SERVING otherwise.
- ``saescope.api.v1.SaeScope``: SERVING when, in addition, a deployment behind the proxy has
  running replicas; NOT_SERVING while none has (starting, or every replica lost).
- any other service: NOT_FOUND (``Check``) or SERVICE_UNKNOWN (``Watch``), as the protocol says.

``Watch`` sends the status, then every change (polled each second). :func:`add_health_servicer`
is the ``grpc_servicer_functions`` entry; ``proxy_patch.install`` calls it too, so the Serve
configs need not list it. Needs ``grpcio-health-checking`` in the proxy's environment.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any, TypeAlias

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

logger = logging.getLogger("ray.serve")

SERVICE = "saescope.api.v1.SaeScope"
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
WATCH_POLL_S = 1.0
_MARK = "_saescope_health"

Status: TypeAlias = health_pb2.HealthCheckResponse.ServingStatus
SERVING: Status = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING: Status = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN: Status = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class ProxyHealth(health_pb2_grpc.HealthServicer):
    """Health of one Serve gRPC proxy (``proxy``: its ``gRPCProxy``; None: always SERVING)."""

    def __init__(self, proxy: Any = None) -> None:
        self._proxy = proxy

    def status(self, service: str) -> Status | None:
        """The status of ``service`` now; None for a service this server does not know."""
        if service not in ("", SERVICE):
            return None
        proxy = self._proxy
        if proxy is None:
            return SERVING
        ready, _ = proxy.proxy_router.ready_for_traffic(proxy._is_head)
        if proxy._is_draining() or not ready:
            return NOT_SERVING
        if service == "":
            return SERVING
        handles = proxy.proxy_router.handles.values()
        return SERVING if any(h.running_replicas_populated() for h in handles) else NOT_SERVING

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: Any
    ) -> health_pb2.HealthCheckResponse:
        status = self.status(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"service: unknown {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(  # type: ignore[override]
        self, request: health_pb2.HealthCheckRequest, context: Any
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        last: Status | None = None
        while True:
            status = self.status(request.service)
            status = SERVICE_UNKNOWN if status is None else status
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            await asyncio.sleep(WATCH_POLL_S)


def add_health_servicer(servicer: Any, server: Any) -> bool:
    """Register :class:`ProxyHealth` on Serve's gRPC server (a ``grpc_servicer_functions``
    entry: Serve passes a mock servicer, unused). Idempotent; False where it cannot be served
    by the proxy itself (a Serve without passthrough services)."""
    if getattr(server, _MARK, False):
        return True
    add_passthrough = getattr(server, "add_passthrough_service", None)
    if add_passthrough is None:
        logger.warning("saescope health: this Ray Serve cannot serve %s itself", HEALTH_SERVICE)
        return False
    add_passthrough(HEALTH_SERVICE)
    # Serve's server holds its gRPCProxy as the owner of its handler factory.
    proxy = getattr(getattr(server, "service_handler_factory", None), "__self__", None)
    if proxy is not None and not hasattr(proxy, "proxy_router"):
        proxy = None
    health_pb2_grpc.add_HealthServicer_to_server(ProxyHealth(proxy), server)
    setattr(server, _MARK, True)
    return True
