"""Steered generation with batched decoding: concurrent requests share every forward pass.

``DecodeBatcher`` holds the active *rows* — a request's steered branch, and its baseline branch
when asked for, each with its own interventions, sampling parameters, ``torch.Generator``, and
place in a shared KV cache. A step is:

1. **admit**: take waiting requests (up to ``max_rows`` rows and ``prefill_tokens`` prompt
   tokens per step), prefill them — rows with prompts of equal length together, one forward
   with no padding — sample their first tokens, and merge their caches into the running batch's
   (both left-padded to a common length; the attention mask hides the padding);
2. **decode**: ONE forward over all active rows with their last tokens (explicit position ids,
   the mask, the shared cache: ``kvcache.BatchCache``) and a steering hook per SAE that applies
   each row's own edits (``steering.apply_edits``, vectorised over rows);
3. **sample and emit** each row's next token, then drop finished, failed and cancelled rows
   from the batch and the cache.

One request's trouble stays its own. A row whose logits are not finite (NaN or inf: an
intervention too strong for the model) fails its request with INVALID_ARGUMENT when the row
has edits, INTERNAL when it has none; a row whose sampling or text handling raises fails its
request with INTERNAL. Either way the request's rows leave the batch and the cache at once and
the other rows go on, exactly as they would have: every row's logits, edits, random generator
and text are its own. A prefill forward that raises fails the requests it was prefilling (the
running batch's cache is untouched). Only a failed decode forward — the one computation all rows
share, which can leave the shared cache half-updated — fails every active request.

Use it from threads or asyncio: ``submit(plan) -> GenerationHandle`` is thread-safe and a daemon
thread runs the steps (``start()``; ``Engine`` starts it on first use). Tests may instead call
``step()`` by hand on a batcher that was never started. Decoding is greedy-exact under batching
up to float noise: padding is masked, and each row's edits touch only its own residual stream.

The stepping thread tells the runtime's observer (``runtime.EngineObserver``) each request's wait
from ``submit`` until a step takes it into the batch, each decode step's rows and time, and
(through ``ModelRuntime.timed``) the steering hooks' SAE encodes.

Conventions: the trace of a branch has one value per position the model read — the prompt, then
every generated token but the last (which is never fed back) — and a ``TokenEvent``'s ``trace``
is the steered features' values (after the edit) at the position that predicted its token; a
conditional intervention's ``fired`` positions count the same way, and a ``TokenEvent``'s
``fired`` lists those that applied at the position that predicted its token.
Completion tokens' ``start``/``end`` are character spans in the completion's text.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import DynamicCache

from saescope.service.errors import InvalidArgument, ResourceExhausted, SaescopeError
from saescope.service.kvcache import BatchCache, cache_kwarg, check_cache_support
from saescope.service.prompts import Encoded
from saescope.service.runtime import LoadedSae, ModelRuntime
from saescope.service.sampling import SamplingPlan, TextStream, choose, make_generator
from saescope.service.steering import EditBatch, RowEdits, StepTrace, steering_hooks
from saescope.service.streams import GenerationHandle
from saescope.service.types import (
    Branch,
    Completion,
    FeatureTrace,
    FinishReason,
    Firing,
    GenerationResult,
    Token,
    TokenEvent,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationPlan:
    """A validated generation request: what the batcher needs and nothing else."""

    sae: LoadedSae
    prompt: Encoded
    sampling: SamplingPlan
    branches: tuple[tuple[Branch, RowEdits], ...]  # steered first, then the baseline if asked
    include_logprobs: bool
    include_trace: bool
    trace_features: tuple[int, ...]  # distinct edited features, first-appearance order


class _Request:
    def __init__(self, plan: GenerationPlan, handle: GenerationHandle) -> None:
        self.plan = plan
        self.handle = handle
        self.rows: list[_Row] = []
        self.submitted = time.perf_counter()
        self.failed = False  # ended with an error; its rows leave at the next eviction


class _Row:
    """One branch of one request while it decodes."""

    def __init__(self, req: _Request, branch: Branch, edits: RowEdits, rt: ModelRuntime) -> None:
        plan = req.plan
        self.req, self.branch, self.edits = req, branch, edits
        self.generator = make_generator(plan.sampling, rt.device)
        self.stream = TextStream(rt.tokenizer, plan.sampling.stop)
        self.ids: list[int] = []
        self.tokens: list[Token] = []
        self.logprobs: list[float] = []
        self.before: list[list[float]] = []  # per position read: traced features before edits
        self.after: list[list[float]] = []
        self.fired: list[list[int]] = []  # per position read: conditional edits that applied
        self.position = len(plan.prompt.ids)  # position id of the next token fed
        self.finish: FinishReason | None = None

    @property
    def live(self) -> bool:
        return self.finish is None and not self.req.failed and not self.req.handle.cancelled

    def completion(self) -> Completion:
        assert self.finish is not None
        plan = self.req.plan
        trace = []
        if plan.include_trace:
            trace = [
                FeatureTrace(
                    feature=f,
                    original=[p[u] for p in self.before],
                    steered=[p[u] for p in self.after],
                )
                for u, f in enumerate(plan.trace_features)
            ]
        fired = [
            Firing(j, [p for p, at in enumerate(self.fired) if j in at])
            for j in self.edits.conditional
        ]
        return Completion(
            text=self.stream.text,
            tokens=self.tokens,
            logprobs=self.logprobs,
            finish_reason=self.finish,
            trace=trace,
            fired=fired,
        )


class DecodeBatcher:
    """Runs every active generation's decode steps as one batch; see the module docstring."""

    def __init__(
        self,
        rt: ModelRuntime,
        *,
        max_rows: int = 32,
        max_pending: int = 256,
        prefill_tokens: int = 4096,
    ) -> None:
        check_cache_support(rt.model)
        self._cache = cache_kwarg(rt.model)  # the forward's name for the KV cache
        if max_rows < 1:
            raise ValueError(f"max_rows: must be ≥ 1, got {max_rows}")
        self.rt = rt
        self.max_rows, self.max_pending, self.prefill_tokens = max_rows, max_pending, prefill_tokens
        self._cv = threading.Condition()
        self._pending: deque[_Request] = deque()
        self._handles: dict[str, GenerationHandle] = {}  # by request id, until the request ends
        self._rows: list[_Row] = []  # owned by the stepping thread, in cache-row order
        self._joining: list[_Request] = []  # admitted this step, not yet in ``_rows``
        self._kv = BatchCache()  # the rows' shared KV cache, in ``_rows`` order
        self._thread: threading.Thread | None = None
        self._closed = False
        self.steps = 0  # decode steps run (for metrics)
        self.last_batch_rows = 0

    # ---- the public, thread-safe side ----------------------------------------------------------
    def submit(self, plan: GenerationPlan, request_id: str | None = None) -> GenerationHandle:
        """Queue a validated plan; its events arrive on the returned handle."""
        handle = GenerationHandle(request_id or uuid.uuid4().hex, on_cancel=self._forget)
        with self._cv:
            if self._closed:
                raise SaescopeError("the engine is shutting down")
            if len(self._pending) >= self.max_pending:
                raise ResourceExhausted(f"{len(self._pending)} generations are already waiting")
            if handle.request_id in self._handles:
                raise ValueError(f"request_id {handle.request_id!r} is already generating")
            self._handles[handle.request_id] = handle
            self._pending.append(_Request(plan, handle))
            self._cv.notify_all()
        return handle

    def cancel(self, request_id: str) -> bool:
        """Cancel a generation by id (as ``handle.cancel()``); False if it is not running."""
        with self._cv:
            handle = self._handles.get(request_id)
        if handle is None:
            return False
        handle.cancel()
        return True

    @property
    def pending(self) -> int:
        """Requests waiting to join the batch."""
        return len(self._pending)

    @property
    def active_rows(self) -> int:
        """Rows decoding, or being prefilled to join."""
        return len(self._rows) + sum(len(r.plan.branches) for r in self._joining)

    def start(self) -> None:
        """Run steps on a daemon thread until ``close()`` (idempotent)."""
        with self._cv:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="saescope-decode", daemon=True
                )
                self._thread.start()

    def close(self) -> None:
        """Stop the thread; every unfinished request ends with an error."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()
        self._fail_all(SaescopeError("generation stopped: the engine is closing"))

    def _forget(self, request_id: str) -> None:
        """A request ended (done, failed or cancelled): drop its id, wake the stepping thread."""
        with self._cv:
            self._handles.pop(request_id, None)
            self._cv.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._closed or bool(self._pending) or bool(self._rows))
                if self._closed:
                    return
            try:
                self.step()
            except Exception as e:  # a bug or out of memory: fail the requests, keep serving
                log.exception("decode step failed")
                self._fail_all(SaescopeError(f"generation failed ({type(e).__name__})"))

    def _fail_all(self, error: SaescopeError) -> None:
        with self._cv:
            reqs = {id(r.req): r.req for r in self._rows}
            reqs |= {id(r): r for r in [*self._joining, *self._pending]}
            self._pending.clear()
        self._rows, self._joining, self._kv = [], [], BatchCache()
        for req in reqs.values():
            self._fail(req, error)  # a request that already failed is not told twice

    # ---- one step ------------------------------------------------------------------------------
    def step(self) -> bool:
        """Admit newcomers, then one decode step; True while there is work left."""
        with torch.inference_mode():
            self._joining = self._take_pending()
            if self._joining:
                self._prefill(self._joining)
            self._joining = []
            self._evict()
            if self._rows:
                self._decode()
                self._evict()
        return bool(self._rows) or bool(self._pending)

    def run_until_idle(self) -> None:
        """Step until nothing is active or waiting (for callers that drive the batcher)."""
        while self.step():
            pass

    def _take_pending(self) -> list[_Request]:
        taken: list[_Request] = []
        rows, tokens = len(self._rows), 0
        with self._cv:
            while self._pending:
                req = self._pending[0]
                if req.handle.cancelled:
                    self._pending.popleft()
                    continue
                n = len(req.plan.branches)
                cost = n * len(req.plan.prompt.ids)
                # An empty batch takes the next request whatever its size: nothing can stall.
                busy = bool(taken or self._rows)
                if busy and (rows + n > self.max_rows or tokens + cost > self.prefill_tokens):
                    break
                taken.append(self._pending.popleft())
                rows, tokens = rows + n, tokens + cost
        now = time.perf_counter()
        for req in taken:  # outside the lock: the observer may take its time
            self.rt.observer.on_admit(now - req.submitted)
        return taken

    def _prefill(self, reqs: list[_Request]) -> None:
        """Prefill newcomers (equal prompt lengths together), sample, merge their caches."""
        by_len: dict[int, list[_Row]] = {}
        for req in reqs:
            for branch, edits in req.plan.branches:
                row = _Row(req, branch, edits, self.rt)
                req.rows.append(row)
                by_len.setdefault(len(req.plan.prompt.ids), []).append(row)
        for length, rows in by_len.items():
            ids = torch.tensor([r.req.plan.prompt.ids for r in rows], device=self.rt.device)
            cache = DynamicCache(config=self.rt.model.config)
            try:
                logits, trace = self._forward(
                    rows, generated=False, input_ids=ids, logits_to_keep=1, **{self._cache: cache}
                )
            except Exception as e:  # out of memory, say: only these newcomers fail
                for r in rows:
                    self._fail(r.req, _internal("prefill", e))
                continue
            self._advance(rows, logits, trace)
            self._rows = self._rows + rows
            self._kv.append(cache, len(rows), length)

    def _decode(self) -> None:
        start = time.perf_counter()
        rows, device = self._rows, self.rt.device
        ids = torch.tensor([[r.ids[-1]] for r in rows], device=device)  # (B, 1)
        positions = torch.tensor([[r.position] for r in rows], device=device)  # (B, 1)
        mask = self._kv.next_mask()  # (B, L + 1)
        logits, trace = self._forward(
            rows,
            generated=True,
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            **{self._cache: self._kv.cache},
        )
        self._kv.mask = mask
        for r in rows:
            r.position += 1
        self.steps += 1
        self.last_batch_rows = len(rows)
        self._advance(rows, logits, trace)  # reads the tokens: the step's kernels are done
        self.rt.observer.on_decode_step(len(rows), time.perf_counter() - start)

    def _forward(
        self, rows: list[_Row], *, generated: bool, **inputs: Any
    ) -> tuple[Tensor, StepTrace]:
        """One model forward with every row's edits; returns last-position logits (B, V)."""
        # The SAE each plan holds, not the pool's entry: under a memory budget the pool may
        # have evicted it since, and the generation finishes with the SAE it started with.
        by_sae: dict[str, list[tuple[int, RowEdits]]] = {}
        sae_of: dict[str, LoadedSae] = {}
        for i, r in enumerate(rows):
            if not r.edits.empty:
                by_sae.setdefault(r.req.plan.sae.sae_id, []).append((i, r.edits))
                sae_of[r.req.plan.sae.sae_id] = r.req.plan.sae
        groups = [
            (
                self.rt.timed(sae_of[sae_id]),  # its encodes reach the observer
                EditBatch.build(members, self.rt.device, sae_of[sae_id].sae.W_dec.dtype),
            )
            for sae_id, members in by_sae.items()
        ]
        record = any(r.req.plan.include_trace for r in rows)
        with (
            self.rt.lock,
            steering_hooks(self.rt.model, groups, generated=generated, record=record) as trace,
        ):
            out = self.rt.model(**inputs, use_cache=True)
        return out.logits[:, -1], trace

    def _advance(self, rows: list[_Row], logits: Tensor, trace: StepTrace) -> None:
        """Record traces, choose each live row's next token and emit it; a row fails alone."""
        finite = _finite_rows(logits)  # (B,)
        greedy = logits.argmax(dim=-1).tolist()  # (B,): one device sync for every greedy row
        chosen: list[int | None] = []
        for i, (r, g) in enumerate(zip(rows, greedy, strict=True)):
            chosen.append(None)
            if not r.live:
                continue
            if not finite[i]:
                self._fail(r.req, _non_finite(r))
                continue
            sampling = r.req.plan.sampling
            try:
                chosen[i] = g if sampling.greedy else choose(logits[i], sampling, r.generator)
            except Exception as e:  # a bug: this request fails, the batch goes on
                self._fail(r.req, _internal("sampling", e))
        logprobs: list[float] = []
        wants = (r.req.plan.include_logprobs for r in rows)
        if any(w and c is not None for w, c in zip(wants, chosen, strict=True)):
            index = torch.tensor([c or 0 for c in chosen], device=logits.device)[:, None]
            logprobs = logits.float().log_softmax(-1).gather(1, index)[:, 0].tolist()
        for i, r in enumerate(rows):
            if i in trace.rows:
                before, after = trace.rows[i]
                r.before += before.tolist()
                r.after += after.tolist()
            r.fired += trace.fired.get(i, [])
            token = chosen[i]
            if token is None or not r.live:  # a branch of the same request may have failed
                continue
            try:
                self._emit(r, token, logprobs[i] if logprobs else None)
            except Exception as e:  # decoding text, say: this request fails, the batch goes on
                self._fail(r.req, _internal("text", e))

    def _emit(self, r: _Row, token_id: int, logprob: float | None) -> None:
        plan, rt = r.req.plan, self.rt
        r.ids.append(token_id)
        start, end = r.stream.push(token_id)
        if token_id in rt.eos_ids:
            r.finish = "eos"
        elif r.stream.stopped:
            r.finish = "stop"
        elif len(r.ids) >= plan.sampling.max_new_tokens:
            r.finish = "length"
        token = Token(token_id, rt.token_text(token_id), start, end, token_id in rt.special_ids)
        r.tokens.append(token)
        if plan.include_logprobs and logprob is not None:
            r.logprobs.append(logprob)
        event = TokenEvent(
            branch=r.branch,
            index=len(r.ids) - 1,
            token=token,
            text=r.stream.take(final=r.finish is not None),
            logprob=logprob if plan.include_logprobs else None,
            trace=list(r.after[-1]) if plan.include_trace and r.after else [],
            fired=list(r.fired[-1]) if r.fired else [],
        )
        r.req.handle.put(event)
        if r.finish is not None and all(row.finish is not None for row in r.req.rows):
            self._complete(r.req)

    def _fail(self, req: _Request, error: SaescopeError) -> None:
        """End ``req`` with ``error``; its rows leave the batch and the cache at the next evict."""
        if req.failed:
            return
        req.failed = True
        req.handle.put(error)
        self._forget(req.handle.request_id)

    def _complete(self, req: _Request) -> None:
        rows = {r.branch: r for r in req.rows}
        baseline = rows.get("baseline")
        req.handle.put(
            GenerationResult(
                sae_id=req.plan.sae.sae_id,
                prompt_tokens=req.plan.prompt.tokens,
                steered=rows["steered"].completion(),
                baseline=baseline.completion() if baseline is not None else None,
            )
        )
        self._forget(req.handle.request_id)

    def _evict(self) -> None:
        """Drop finished, failed and cancelled rows from the batch and the cache."""
        keep = [i for i, r in enumerate(self._rows) if r.live]
        if len(keep) < len(self._rows):
            self._rows = [self._rows[i] for i in keep]
            self._kv.select(keep)


def _finite_rows(logits: Tensor) -> list[bool]:
    """Per row of ``logits`` (B, V): no NaN, no +inf, and not every entry −inf."""
    bad = (logits.isnan() | logits.isposinf()).any(dim=-1) | logits.isneginf().all(dim=-1)
    return (~bad).tolist()


def _non_finite(r: _Row) -> SaescopeError:
    """The error of a row whose logits are not finite: the request's edits, if it has any."""
    at = f"generated token {len(r.ids)}" if r.ids else "the prompt"
    if r.edits.edits:
        return InvalidArgument(
            "interventions",
            f"the {r.branch} model's logits became NaN or infinite at {at}: the edits are "
            "too strong for this model; use smaller values",
        )
    log.error("non-finite logits without edits (%s branch, %s)", r.branch, at)
    return SaescopeError(f"generation failed: the model's logits became NaN or infinite at {at}")


def _internal(stage: str, e: Exception) -> SaescopeError:
    """A request's own failure that is nobody's mistake: logged, reported as INTERNAL."""
    log.error("generation failed in %s", stage, exc_info=e)
    return SaescopeError(f"generation failed ({type(e).__name__})")
