"""The Ray Serve application: the ``SaeScope`` deployment, one method per RPC, and its builder.

Thin by design (DESIGN §2), and it sees the engine only as ``types.EngineClient``. Serve's
gRPC proxy calls the method named as the RPC with the request message; each method converts it
(``convert``, by shape), hands it to the engine off the event loop, and converts the result
back. The RPCs that are one engine call (``types.UNARY_RPCS``: Tokenize, GetFeature, contrast
search) get that method from ``_unary_rpc``; the others are written out below.
``_call`` is the one place where errors become gRPC status codes: a ``SaescopeError`` becomes
its ``code`` with its message as details; anything else becomes INTERNAL with a short message,
its traceback only in the replica's log — or UNAVAILABLE once the replica is shutting down (the
call failed because the replica went away: retrying reaches another one). Ray 2.60's replica
wraps an exception raised after ``grpc_context.set_code`` in ``gRPCStatusError``, and its proxy
sends that code and those details — in unary calls and mid-stream alike. Failures the replica
never sees (it died, the request could not be parsed) are mapped in the proxy
(``proxy_errors``).

``_call`` also checks access first (``access``: API keys, several at once; without keys, only
loopback callers). GetInfo is answered on the event loop from the engine's bookkeeping (the
SAEs' states under a memory budget included): it never waits for a worker thread behind model
work. Health checks go to the proxy
(``grpc.health.v1``, ``health``), never to a replica.

Forward passes of concurrent activation calls are batched into one
``engine.run_activation_parts`` by a work-conserving ``batching.ForwardBatcher`` (the next batch
is what queued while the engine was busy; ``@serve.batch`` forms batches on arrival instead, see
``batching``). Each call is planned first (validated and tokenised, off the loop) and cut into
slices of ``engine.slice_tokens`` tokens, which concurrent calls run in turns. Generation
streams come from the engine's decode batcher (``generation_io``); they stop decoding when the
call is cancelled or its deadline passes.

The same deployment serves the web explorer over Serve's HTTP proxy (``web``: its pages, and
every RPC transcoded to JSON, calling the methods below with an HTTP request as their context).

Start it with ``saescope serve``, or ``serve run`` on the shipped ``serve-default`` config; the
Serve config's ``args`` are validated by ``AppConfig``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, TypeVar, get_type_hints

import grpc
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from ray import serve
from ray.serve import Application
from starlette.applications import Starlette

from saescope.api.v1 import saescope_pb2 as pb
from saescope.service import convert
from saescope.service.activations import ActivationsPart
from saescope.service.batching import ForwardBatcher
from saescope.service.config import AppConfig, load_app_config
from saescope.service.errors import INTERNAL_DETAILS, SaescopeError, Unavailable
from saescope.service.generation_io import Generations
from saescope.service.metrics import ServiceMetrics
from saescope.service.types import (
    UNARY_RPCS,
    ActivationsRequest,
    ActivationsResult,
    EngineClient,
    GenerateRequest,
    GenerationResult,
    PromptActivations,
)
from saescope.service.web import CallContext, build_web_app

logger = logging.getLogger("ray.serve")
R = TypeVar("R")

SHUTTING_DOWN = Unavailable("the replica is shutting down; retry the call")


class RpcFailed(Exception):
    """Raised once the call's status code and details are set on its context."""


def _unary_rpc(rpc: str, method: Callable[..., Any]) -> Callable[..., Any]:
    """The app's method for an RPC that one ``EngineClient`` method answers alone: decode the
    request by shape, call the engine off the event loop, encode the result by shape."""
    request_type = get_type_hints(method)["req"]
    response_type = GetMessageClass(
        pb.DESCRIPTOR.services_by_name["SaeScope"].methods_by_name[rpc].output_type
    )
    name = method.__name__

    async def call(self: SaeScope, request: Message, grpc_context: CallContext) -> Message:
        async with self._call(rpc, grpc_context):
            req = convert.request(request, request_type)
            return convert.response(
                await self._run(getattr(self._engine, name), req), response_type
            )

    call.__name__ = call.__qualname__ = rpc
    call.__doc__ = f"``{rpc}``: ``EngineClient.{name}``, converted by shape."
    return call


def _with_unary_rpcs(cls: type[R]) -> type[R]:
    """Give the deployment a method per ``UNARY_RPCS`` entry, named as the RPC (what Serve's
    gRPC proxy calls)."""
    for rpc, method in UNARY_RPCS.items():
        setattr(cls, rpc, _unary_rpc(rpc, method))
    return cls


@serve.deployment(name="SaeScope")
@serve.ingress()  # the web explorer, built by __serve_build_asgi_app__ once the engine is up
@_with_unary_rpcs
class SaeScope:
    """Hosts the model and its SAEs; answers ``saescope.api.v1.SaeScope``."""

    def __init__(self, config: dict[str, Any]) -> None:
        cfg = load_app_config(config)
        from saescope.service.engine import Engine  # torch & the model: only in the replica

        if cfg.torch_threads:
            import torch

            torch.set_num_threads(cfg.torch_threads)
        self._access = cfg.access_policy()
        self._closing = False
        self._metrics = ServiceMetrics()
        self._pool = ThreadPoolExecutor(
            max_workers=cfg.max_ongoing_requests, thread_name_prefix="engine"
        )
        self._engine: EngineClient = Engine(
            cfg.model,
            {k: str(v) for k, v in cfg.sae_paths.items()},
            device=cfg.device,
            dtype=cfg.dtype,
            limits=cfg.limits.to_domain(),
            default_sae_id=cfg.default_sae_id,
            cache_dir=cfg.cache_dir,
            max_batch_rows=cfg.max_decode_rows,
            slice_tokens=cfg.forward_slice_tokens,
            observer=self._metrics,  # decode batch sizes, decode queue waits, SAE encode times
            metrics_sync_timing=cfg.metrics_sync_timing,
            sae_memory_budget_bytes=cfg.sae_memory_budget_bytes,
        )
        self._generation = Generations(self._engine, self._pool, self._metrics)
        self._sampler: asyncio.Task[None] | None = None
        self._forward_waiting = 0
        self._forward: ForwardBatcher[ActivationsPart, list[PromptActivations]] = ForwardBatcher(
            partial(self._run, self._engine.run_activation_parts),
            max_batch_size=cfg.max_batch_size,
            wait_s=cfg.batch_wait_timeout_s,
            on_batch=partial(self._metrics.batch, "forward"),
            cost=lambda part: part.tokens,
            max_batch_cost=self._engine.slice_tokens,
        )
        logger.info("saescope: serving %s with SAEs %s", cfg.model, sorted(cfg.sae_paths))

    def __del__(self) -> None:
        # Serve's shutdown hook: stop the decode thread. Unfinished generations end with an
        # error, which ``_call`` turns into UNAVAILABLE: another replica can answer a retry.
        self._closing = True
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.close()

    def __serve_build_asgi_app__(self) -> Starlette:
        """The web explorer (``web``): its API calls go to the RPC methods below by name."""
        return build_web_app(partial(getattr, self), failed=RpcFailed)

    # ---- RPCs (named as in saescope.proto) -----------------------------------------------------
    async def GetInfo(
        self, request: pb.GetInfoRequest, grpc_context: CallContext
    ) -> pb.GetInfoResponse:
        async with self._call("GetInfo", grpc_context):
            # On the loop: the engine's info is bookkeeping (the SAE pool's lock is never held
            # during a load), so GetInfo never waits behind model work.
            return convert.response(self._engine.info(), pb.GetInfoResponse)

    async def GetFeatureActivations(
        self, request: pb.GetFeatureActivationsRequest, grpc_context: CallContext
    ) -> pb.GetFeatureActivationsResponse:
        async with self._call("GetFeatureActivations", grpc_context):
            result = await self._activations(convert.request(request, ActivationsRequest))
            prompts = result.by_sae[0].prompts if result.by_sae else result.prompts
            tokens = sum(len(p.tokens) for p in prompts)
            self._metrics.tokens("GetFeatureActivations", tokens_in=tokens)
            return convert.response(result, pb.GetFeatureActivationsResponse)

    async def GenerateSteered(
        self, request: pb.GenerateSteeredRequest, grpc_context: CallContext
    ) -> pb.GenerateSteeredResponse:
        async with self._call("GenerateSteered", grpc_context):
            req = convert.request(request, GenerateRequest)
            result: GenerationResult | None = None
            async for item in self._generation.stream(req, "GenerateSteered"):
                if isinstance(item, GenerationResult):
                    result = item
            assert result is not None, "a generation stream ends with its result"
            return convert.response(result, pb.GenerateSteeredResponse)

    async def StreamGenerateSteered(
        self, request: pb.GenerateSteeredRequest, grpc_context: CallContext
    ) -> AsyncIterator[pb.GenerateSteeredEvent]:
        # An async generator: when the client cancels (or its deadline passes), Serve cancels
        # this task; closing the stream cancels the engine's handle, and decoding stops.
        async with self._call("StreamGenerateSteered", grpc_context):
            req = convert.request(request, GenerateRequest)
            async for item in self._generation.stream(req, "StreamGenerateSteered"):
                yield convert.generate_event(item)

    # ---- operations (reachable through a DeploymentHandle, not over gRPC) ----------------------
    async def stats(self) -> dict[str, int]:
        """Counters for operators and tests: open streams, decoding rows, decode steps, …"""
        return self._generation.stats() | {"forward_waiting": self._forward_waiting}

    # ---- the one place errors become status codes ------------------------------------------------
    @asynccontextmanager
    async def _call(self, rpc: str, ctx: CallContext) -> AsyncIterator[None]:
        start = time.perf_counter()
        code = "OK"
        if self._sampler is None:
            self._sampler = asyncio.create_task(self._generation.sample_forever())
        try:
            self._access.check(ctx.invocation_metadata(), ctx.peer())
            yield
        except SaescopeError as e:
            if self._closing and e.code == "INTERNAL":
                e = SHUTTING_DOWN
            code = e.code
            raise _fail(ctx, e.code, e.message) from None
        except (asyncio.CancelledError, GeneratorExit):
            code = "CANCELLED"
            raise
        except Exception:
            if self._closing:
                code = SHUTTING_DOWN.code
                raise _fail(ctx, code, SHUTTING_DOWN.message) from None
            code = "INTERNAL"
            logger.exception("saescope: %s failed", rpc)
            raise _fail(ctx, code, INTERNAL_DETAILS) from None
        finally:
            self._metrics.request_done(rpc, code, time.perf_counter() - start)

    # ---- engine work, off the event loop ---------------------------------------------------------
    async def _run(self, fn: Callable[..., R], *args: Any) -> R:
        return await asyncio.get_running_loop().run_in_executor(self._pool, partial(fn, *args))

    async def _activations(self, req: ActivationsRequest) -> ActivationsResult:
        self._forward_waiting += 1
        self._metrics.queue_depth("forward", self._forward_waiting)
        try:
            plan = await self._run(self._engine.plan_activations, req)
            parts = plan.parts(self._engine.slice_tokens)
            return plan.result(parts, await self._forward.submit_all(parts))
        finally:
            self._forward_waiting -= 1
            self._metrics.queue_depth("forward", self._forward_waiting)


MAX_DETAILS_BYTES = 1024


def _fail(ctx: CallContext, code: str, details: str) -> RpcFailed:
    """Set the call's status. Details are cut to ``MAX_DETAILS_BYTES`` of UTF-8: they echo the
    caller's input (an unknown sae_id, a role), and gRPC percent-encodes non-ASCII bytes into a
    header that clients cap at 8–16 KiB — over it, the caller would see RESOURCE_EXHAUSTED."""
    raw = details.encode()
    if len(raw) > MAX_DETAILS_BYTES:
        details = raw[: MAX_DETAILS_BYTES - 3].decode(errors="ignore") + "…"
    ctx.set_code(grpc.StatusCode[code])
    ctx.set_details(details)
    return RpcFailed(f"{code}: {details}")


def build_app(args: dict[str, Any]) -> Application:
    """Serve application builder (``import_path: saescope.service.app:build_app``)."""
    cfg: AppConfig = load_app_config(args)
    deployment: Any = SaeScope  # a serve.Deployment, which the type checker sees as the class
    return deployment.options(**cfg.deployment_options()).bind(cfg.model_dump(mode="json"))
