"""How large one gRPC message may be, and how Ray Serve's gRPC proxy is told so.

Ray Serve 2.60's gRPC proxy receives and sends messages of up to 2 GiB unless told otherwise:
its server options come from ``RAY_SERVE_GRPC_MAX_MESSAGE_SIZE``
(``ray.serve._private.constants``), read from the proxy process's environment when it imports
Serve, and applied to ``grpc.max_receive_message_length`` and ``grpc.max_send_message_length``
alike. ``gRPCOptions`` has no field for it, and the servicer functions Serve calls in the proxy
run after its server is built, too late to change its options. So the bound is set through the
environment, which Ray supports in three ways; every way of starting saescope uses one:

- Python (``saescope serve``, the tests, the benches)::

      serve.start(..., controller_options=wire_limits.controller_options())

  Serve's controller starts the proxies, and actors inherit their creator's runtime
  environment, so every proxy sees the variable;
- a Serve config file (``serve run``, ``serve deploy``, KubeRay ``serveConfigV2``), top level::

      controller_options:
        runtime_env:
          env_vars:
            RAY_SERVE_GRPC_MAX_MESSAGE_SIZE: "4194304"

- the environment of every Ray node (KubeRay: each container's ``env``).

A bigger message is refused by gRPC itself as it arrives — RESOURCE_EXHAUSTED, "Received message
larger than max" — before the proxy parses it or a replica sees it. 4 MiB is gRPC's own default
and what common clients accept. Since the same number bounds what the proxy sends, the engine
keeps every response under ``Limits.max_response_bytes`` (3 MiB by default), checked before
any work is done.
"""

from __future__ import annotations

from typing import Any

MAX_MESSAGE_BYTES = 4 * 2**20
"""Largest request or response message the service accepts or sends (gRPC's default)."""
ENV_VAR = "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"
"""The environment variable Ray Serve's proxy reads its message-size bound from."""


def proxy_env(max_bytes: int = MAX_MESSAGE_BYTES) -> dict[str, str]:
    """Environment variables that bound the proxy's messages to ``max_bytes``."""
    if max_bytes < 1:
        raise ValueError(f"max_bytes: must be ≥ 1, got {max_bytes}")
    return {ENV_VAR: str(max_bytes)}


def controller_options(max_bytes: int = MAX_MESSAGE_BYTES) -> dict[str, Any]:
    """``serve.start(controller_options=...)``: the proxies inherit the controller's env."""
    return {"runtime_env": {"env_vars": proxy_env(max_bytes)}}
