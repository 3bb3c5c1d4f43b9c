"""The Ray Serve application: the ``SaeScope`` deployment, one method per RPC, and its builder.

Thin by design (DESIGN §2). Serve's gRPC proxy calls the method named as the RPC with the
request message; each method converts it (``convert``), hands it to the engine off the event
loop, and converts the result back. ``_call`` is the one place where errors become gRPC status
codes: a ``SaescopeError`` becomes its ``code`` with its message as details; anything else
becomes INTERNAL with a short message, its traceback only in the replica's log. Ray 2.60's
replica wraps an exception raised after ``grpc_context.set_code`` in ``gRPCStatusError``, and
its proxy sends that code and those details — in unary calls and mid-stream alike.

Forward passes of concurrent activation calls are batched into one ``engine.activations_many``
by a work-conserving ``batching.ForwardBatcher`` (the next batch is what queued while the engine
was busy; ``@serve.batch`` forms batches on arrival instead, see ``batching``). Generation
streams come from the engine's decode batcher (``generation_io``); they stop decoding when the
call is cancelled or its deadline passes.

Start it with ``saescope serve``, or ``serve run configs/serve-default.yaml``; the Serve config's
``args`` are validated by ``AppConfig``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, TypeVar

import grpc
from ray import serve
from ray.serve import Application
from ray.serve.grpc_util import RayServegRPCContext

from saescope.api.v1 import saescope_pb2 as pb
from saescope.service import convert
from saescope.service.batching import ForwardBatcher
from saescope.service.config import AppConfig, load_app_config
from saescope.service.errors import SaescopeError, Unauthenticated
from saescope.service.generation_io import Generations
from saescope.service.metrics import ServiceMetrics
from saescope.service.types import ActivationsRequest, ActivationsResult, GenerateResult

logger = logging.getLogger("ray.serve")
R = TypeVar("R")

INTERNAL_DETAILS = "internal error; the server log has the details"


class RpcFailed(Exception):
    """Raised once the call's status code and details are set on its context."""


@serve.deployment(name="SaeScope")
class SaeScope:
    """Hosts the model and its SAEs; answers ``saescope.api.v1.SaeScope``."""

    def __init__(self, config: dict[str, Any]) -> None:
        cfg = load_app_config(config)
        from saescope.service.engine import Engine  # torch & the model: only in the replica

        if cfg.torch_threads:
            import torch

            torch.set_num_threads(cfg.torch_threads)
        self._api_key = cfg.api_key()
        self._metrics = ServiceMetrics()
        self._pool = ThreadPoolExecutor(
            max_workers=cfg.max_ongoing_requests, thread_name_prefix="engine"
        )
        self._engine = Engine(
            cfg.model,
            {k: str(v) for k, v in cfg.sae_paths.items()},
            device=cfg.device,
            dtype=cfg.dtype,
            limits=cfg.limits.to_domain(),
            default_sae_id=cfg.default_sae_id,
            cache_dir=cfg.cache_dir,
            max_batch_rows=cfg.max_decode_rows,
            observer=self._metrics,  # decode batch sizes, decode queue waits, SAE encode times
            metrics_sync_timing=cfg.metrics_sync_timing,
        )
        self._generation = Generations(self._engine, self._pool, self._metrics)
        self._sampler: asyncio.Task[None] | None = None
        self._forward_waiting = 0
        self._forward: ForwardBatcher[ActivationsRequest, ActivationsResult | SaescopeError] = (
            ForwardBatcher(
                partial(self._run, self._engine.activations_many),
                max_batch_size=cfg.max_batch_size,
                wait_s=cfg.batch_wait_timeout_s,
                on_batch=partial(self._metrics.batch, "forward"),
            )
        )
        logger.info("saescope: serving %s with SAEs %s", cfg.model, sorted(cfg.sae_paths))

    def __del__(self) -> None:
        # Serve's shutdown hook: stop the decode thread (unfinished generations end with an error).
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.close()

    # ---- RPCs (named as in saescope.proto) -----------------------------------------------------
    async def GetInfo(
        self, request: pb.GetInfoRequest, grpc_context: RayServegRPCContext
    ) -> pb.GetInfoResponse:
        async with self._call("GetInfo", grpc_context):
            return convert.info_response(await self._run(self._engine.info))

    async def Tokenize(
        self, request: pb.TokenizeRequest, grpc_context: RayServegRPCContext
    ) -> pb.TokenizeResponse:
        async with self._call("Tokenize", grpc_context):
            prompt = convert.tokenize_request(request)
            return convert.tokenize_response(await self._run(self._engine.tokenize, prompt))

    async def GetFeatureActivations(
        self, request: pb.GetFeatureActivationsRequest, grpc_context: RayServegRPCContext
    ) -> pb.GetFeatureActivationsResponse:
        async with self._call("GetFeatureActivations", grpc_context):
            result = await self._activations(convert.activations_request(request))
            tokens = sum(len(p.tokens) for p in result.prompts)
            self._metrics.tokens("GetFeatureActivations", tokens_in=tokens)
            return convert.activations_response(result)

    async def GenerateSteered(
        self, request: pb.GenerateSteeredRequest, grpc_context: RayServegRPCContext
    ) -> pb.GenerateSteeredResponse:
        async with self._call("GenerateSteered", grpc_context):
            req = convert.generate_request(request)
            result: GenerateResult | None = None
            async for item in self._generation.stream(req, "GenerateSteered"):
                if isinstance(item, GenerateResult):
                    result = item
            assert result is not None, "a generation stream ends with its result"
            return convert.generate_response(result)

    async def StreamGenerateSteered(
        self, request: pb.GenerateSteeredRequest, grpc_context: RayServegRPCContext
    ) -> AsyncIterator[pb.GenerateSteeredEvent]:
        # An async generator: when the client cancels (or its deadline passes), Serve cancels
        # this task; closing the stream cancels the engine's handle, and decoding stops.
        async with self._call("StreamGenerateSteered", grpc_context):
            req = convert.generate_request(request)
            async for item in self._generation.stream(req, "StreamGenerateSteered"):
                yield convert.generate_event(item)

    async def SearchFeaturesByContrast(
        self, request: pb.SearchFeaturesByContrastRequest, grpc_context: RayServegRPCContext
    ) -> pb.SearchFeaturesByContrastResponse:
        async with self._call("SearchFeaturesByContrast", grpc_context):
            req = convert.contrast_request(request)
            return convert.contrast_response(await self._run(self._engine.contrast, req))

    async def GetFeature(
        self, request: pb.GetFeatureRequest, grpc_context: RayServegRPCContext
    ) -> pb.GetFeatureResponse:
        async with self._call("GetFeature", grpc_context):
            req = convert.feature_request(request)
            return convert.feature_response(await self._run(self._engine.feature, req))

    # ---- operations (reachable through a DeploymentHandle, not over gRPC) ----------------------
    async def stats(self) -> dict[str, int]:
        """Counters for operators and tests: open streams, decoding rows, decode steps, …"""
        return self._generation.stats() | {"forward_waiting": self._forward_waiting}

    # ---- the one place errors become status codes ------------------------------------------------
    @asynccontextmanager
    async def _call(self, rpc: str, ctx: RayServegRPCContext) -> AsyncIterator[None]:
        start = time.perf_counter()
        code = "OK"
        if self._sampler is None:
            self._sampler = asyncio.create_task(self._generation.sample_forever())
        try:
            self._authenticate(ctx)
            yield
        except SaescopeError as e:
            code = e.code
            raise _fail(ctx, e.code, e.message) from None
        except (asyncio.CancelledError, GeneratorExit):
            code = "CANCELLED"
            raise
        except Exception:
            code = "INTERNAL"
            logger.exception("saescope: %s failed", rpc)
            raise _fail(ctx, code, INTERNAL_DETAILS) from None
        finally:
            self._metrics.request_done(rpc, code, time.perf_counter() - start)

    def _authenticate(self, ctx: RayServegRPCContext) -> None:
        if self._api_key is None:
            return
        sent = ""
        for key, value in ctx.invocation_metadata():
            if key == "x-api-key":
                sent = value
            elif key == "authorization" and value.lower().startswith("bearer "):
                sent = value[7:].strip()
        if not sent:
            raise Unauthenticated("an API key is required: metadata x-api-key or authorization")
        if not hmac.compare_digest(sent.encode(), self._api_key.encode()):
            raise Unauthenticated("the API key is not valid")

    # ---- engine work, off the event loop ---------------------------------------------------------
    async def _run(self, fn: Callable[..., R], *args: Any) -> R:
        return await asyncio.get_running_loop().run_in_executor(self._pool, partial(fn, *args))

    async def _activations(self, req: ActivationsRequest) -> ActivationsResult:
        self._forward_waiting += 1
        self._metrics.queue_depth("forward", self._forward_waiting)
        try:
            result = await self._forward.submit(req)
        finally:
            self._forward_waiting -= 1
            self._metrics.queue_depth("forward", self._forward_waiting)
        if isinstance(result, BaseException):
            raise result
        return result


def _fail(ctx: RayServegRPCContext, code: str, details: str) -> RpcFailed:
    ctx.set_code(grpc.StatusCode[code])
    ctx.set_details(details)
    return RpcFailed(f"{code}: {details}")


def build_app(args: dict[str, Any]) -> Application:
    """Serve application builder (``import_path: saescope.service.app:build_app``)."""
    cfg: AppConfig = load_app_config(args)
    deployment: Any = SaeScope  # a serve.Deployment, which the type checker sees as the class
    return deployment.options(**cfg.deployment_options()).bind(cfg.model_dump(mode="json"))
