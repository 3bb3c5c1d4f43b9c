"""The engine: a language model, its SAEs, and every RPC's work, in plain Python + torch.

``Engine`` implements ``types.EngineClient``, the interface the Ray Serve app calls: one method
per RPC, on domain types (``types.py``). It validates (raising ``errors.*`` that name the
field), then delegates: ``prompts`` (rendering and tokenisation), ``activations`` (forward +
encode), ``contrast`` (statistics), ``features`` (GetFeature), ``catalog`` (GetFeature's
catalog fields, ListFeatures, SearchFeatures' text half), ``attribution``
(AttributeFeatures: a forward and a backward), ``steering`` + ``sampling`` + ``generation``
(steered decoding through the shared ``DecodeBatcher``). Model forwards take the
runtime's FIFO lock; everything runs under ``torch.inference_mode()`` but attribution's
backward, which needs a gradient.

Cheap checks come before costly work: field values, then prompt sizes in characters, then
tokens (per prompt and per call), then the response's size, and only then a forward pass.
Activation calls are planned (``plan_activations``) and run in parts (``run_activation_parts``)
of about ``slice_tokens`` tokens, which the app's forward batcher interleaves across calls;
contrast search takes the FIFO lock per slice, so other work runs between its slices.

Generation from asyncio (what the app does; ``generate``/``generate_stream`` are the blocking
forms of the same path)::

    handle = engine.submit_generate(req)     # validates now: raises SaescopeError
    try:
        async for item in handle:            # TokenEvent ..., then the GenerationResult
            ...
    finally:
        handle.cancel_unless_done()          # the client left: its rows leave the batch

``observer`` (``runtime.EngineObserver``; default: none) hears each SAE encode, decode step and
admission to the decode batch, from the threads that do the work — the app's metrics. Encodes
are timed on CPU; on GPU only with ``metrics_sync_timing``, which synchronises the device around
each encode (see ``runtime``).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

from saescope.service import activations, attribution, catalog, contrast, features, prompts
from saescope.service.activations import ActivationsPart, ActivationsPlan
from saescope.service.errors import InvalidArgument, NotFound, OutOfRange, SaescopeError
from saescope.service.generation import DecodeBatcher, GenerationPlan
from saescope.service.output_scores import output_scores
from saescope.service.runtime import (
    DTYPES,
    EngineObserver,
    LoadedSae,
    ModelRuntime,
    NoObserver,
    load_saes,
)
from saescope.service.sae_pool import SaePool
from saescope.service.sampling import plan_sampling
from saescope.service.steering import RowEdits, distinct_features, validate_interventions
from saescope.service.streams import GenerationHandle
from saescope.service.types import (
    ActivationsRequest,
    ActivationsResult,
    AttributeRequest,
    Attribution,
    Branch,
    ContrastRequest,
    ContrastResult,
    EngineClient,
    Feature,
    FeaturePage,
    FeatureRequest,
    FeatureSearch,
    GenerateRequest,
    GenerationResult,
    Info,
    Limits,
    ListFeaturesRequest,
    Prompt,
    PromptActivations,
    SearchFeaturesRequest,
    TokenEvent,
    Tokenization,
    TokenizeRequest,
)
from saescope.training import models, positions

# What a SearchFeatures query is read after (``Engine._query_in_context``): neutral, short, and
# ending where a topic word follows.
QUERY_CONTEXT = "Topic:"


def _version() -> str:
    try:
        return importlib.metadata.version("saescope")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class Engine(EngineClient):
    """A model and its SAEs, serving every RPC; see the module docstring."""

    def __init__(
        self,
        model: str,
        saes: Mapping[str, str | Path],
        *,
        device: str = "auto",
        dtype: str = "float32",
        limits: Limits = Limits(),  # noqa: B008 (frozen dataclass: a safe default)
        default_sae_id: str | None = None,
        cache_dir: str | Path | None = None,
        max_batch_rows: int = 32,
        max_pending_generations: int = 256,
        max_batch_tokens: int = activations.DEFAULT_MAX_BATCH_TOKENS,
        slice_tokens: int | None = None,
        observer: EngineObserver | None = None,
        metrics_sync_timing: bool = False,
        sae_memory_budget_bytes: int | None = None,
    ) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype: must be one of {sorted(DTYPES)}, got {dtype!r}")
        lm, tokenizer = models.load_model(
            model,
            device=device,
            dtype=DTYPES[dtype],
            cache_dir=Path(cache_dir) if cache_dir is not None else None,
        )
        device_ = next(lm.parameters()).device
        model_name = models.DEFAULT_MODEL_NAME if model == models.DEFAULT_MODEL else model
        self.rt = ModelRuntime(
            model=lm,
            tokenizer=tokenizer,
            model_name=model_name,
            device=device_,
            dtype=DTYPES[dtype],
            default_sae_id="",
            observer=observer if observer is not None else NoObserver(),
            sync_timing=metrics_sync_timing,
        )
        paths = dict(saes)

        def load(sae_id: str) -> LoadedSae:
            one = {sae_id: paths[sae_id]}
            return load_saes(
                lm, one, device=device_, model_name=model_name, token_text=self.rt.token_text
            )[sae_id]

        loaded = self.rt.saes = SaePool(list(paths), load, sae_memory_budget_bytes)
        if default_sae_id is None:
            default_sae_id = next(iter(loaded), "")
        elif default_sae_id not in loaded:
            raise ValueError(f"default_sae_id: {default_sae_id!r} is not among the SAEs loaded")
        self.rt.default_sae_id = default_sae_id
        self.limits = limits
        self.prompt_limits = prompts.PromptLimits.of(
            tokenizer, limits.max_tokens_per_prompt, limits.max_tokens_per_call
        )
        self.max_batch_tokens = max_batch_tokens
        if slice_tokens is not None and slice_tokens < 1:
            raise ValueError(f"slice_tokens: must be ≥ 1, got {slice_tokens}")
        slices = activations.SLICE_TOKENS
        self.slice_tokens = slice_tokens or slices.get(device_.type, slices["cuda"])
        self.batcher = DecodeBatcher(
            self.rt, max_rows=max_batch_rows, max_pending=max_pending_generations
        )

    def close(self) -> None:
        """Stop the decode thread (unfinished generations end with an error)."""
        self.batcher.close()

    # ---- GetInfo / Tokenize ----------------------------------------------------------------------
    def info(self) -> Info:
        cfg = self.rt.model.config
        return Info(
            model=self.rt.model_name,
            dtype=str(self.rt.dtype).removeprefix("torch."),
            device=str(self.rt.device),
            num_layers=int(cfg.num_hidden_layers),
            d_model=int(cfg.hidden_size),
            vocab_size=int(cfg.vocab_size),
            has_chat_template=bool(getattr(self.rt.tokenizer, "chat_template", None)),
            saes=self.rt.saes.infos(),
            default_sae_id=self.rt.default_sae_id,
            limits=self.limits,
            version=_version(),
            sae_memory_budget_bytes=self.rt.saes.budget_bytes or 0,
            sae_memory_bytes=self.rt.saes.resident_bytes,
        )

    def tokenize(self, req: TokenizeRequest) -> Tokenization:
        return prompts.encode(self.rt, req.prompt, "prompt", self.prompt_limits).tokenized

    # ---- GetFeatureActivations -------------------------------------------------------------------
    def activations(self, req: ActivationsRequest) -> ActivationsResult:
        result = self.activations_many([req])[0]
        if isinstance(result, SaescopeError):
            raise result
        return result

    def activations_many(
        self, reqs: list[ActivationsRequest]
    ) -> list[ActivationsResult | SaescopeError]:
        """Many requests, one batch of padded forwards over all their prompts.

        A request's mistake comes back in its place as the error; the others still run.
        """
        plans: list[ActivationsPlan | SaescopeError] = []
        for req in reqs:
            try:
                plans.append(self.plan_activations(req))
            except SaescopeError as e:
                plans.append(e)
        parts = [p.whole() for p in plans if isinstance(p, ActivationsPlan)]
        outs = iter(self.run_activation_parts(parts))
        return [
            p if isinstance(p, SaescopeError) else p.result([p.whole()], [next(outs)])
            for p in plans
        ]

    def plan_activations(self, req: ActivationsRequest) -> ActivationsPlan:
        """Validate and tokenise ``req``, and bound its response's size; no forward yet."""
        saes = self._saes_of(req)
        for ls in saes:
            activations.validate_request(ls, req, self.limits)
        encoded = prompts.encode_many(
            self.rt, req.prompts, "prompts", self.prompt_limits, max_prompts=self.limits.max_prompts
        )
        size = sum(activations.response_bytes(encoded, req, ls) for ls in saes)
        if size > self.limits.max_response_bytes:
            tokens = sum(len(e.ids) for e in encoded)
            raise OutOfRange(
                "prompts",
                size,
                self.limits.max_response_bytes,
                f"bytes of response ({tokens} tokens × top_k_per_token {req.top_k_per_token} "
                f"and {len(req.feature_ids)} feature_ids)",
            )
        return ActivationsPlan(req, saes, encoded)

    def _saes_of(self, req: ActivationsRequest) -> tuple[LoadedSae, ...]:
        """The SAE ``req`` names, or its ``sae_ids``: distinct, at most ``max_features``, and
        together within the SAE memory budget (each is held until the call ends)."""
        if not req.sae_ids:
            return (self.rt.get_sae(req.sae_id),)
        if req.sae_id:
            raise InvalidArgument("sae_ids", "set sae_id or sae_ids, not both")
        if len(req.sae_ids) > self.limits.max_features:
            raise OutOfRange("sae_ids", len(req.sae_ids), self.limits.max_features, "SAEs")
        repeated = sorted({i for i in req.sae_ids if req.sae_ids.count(i) > 1})
        if repeated:
            raise InvalidArgument("sae_ids", f"{repeated[0]!r} is named more than once")
        pool = self.rt.saes
        for i, sae_id in enumerate(req.sae_ids):
            if not sae_id:
                raise InvalidArgument(f"sae_ids[{i}]", "must not be empty")
            if sae_id not in pool:
                known = ", ".join(pool) or "none"
                raise NotFound(f"sae_ids[{i}]: no SAE {sae_id[:64]!r} is loaded (loaded: {known})")
        together = sum(pool.bytes_of(i) for i in req.sae_ids)
        if pool.budget_bytes is not None and together > pool.budget_bytes:
            raise OutOfRange(
                "sae_ids", together, pool.budget_bytes, "bytes of SAE tensors together (budget)"
            )
        return tuple(self.rt.get_sae(i) for i in req.sae_ids)

    def run_activation_parts(self, parts: list[ActivationsPart]) -> list[list[PromptActivations]]:
        """Per part, its prompts' activations: one batch of padded forwards over all of them.

        The app's ``batching.ForwardBatcher`` hands it the parts of calls that queued together.
        """
        flat = [(part, i) for part in parts for i in part.indices]
        hookpoints = sorted({ls.hookpoint for part in parts for ls in part.plan.saes})
        residuals = activations.forward_residuals(
            self.rt,
            [part.plan.encoded[i].ids for part, i in flat],
            hookpoints,
            max_batch_tokens=self.max_batch_tokens,
        )
        out: list[list[PromptActivations]] = []
        k = 0
        for part in parts:
            plan = part.plan
            timed = [self.rt.timed(ls) for ls in plan.saes]  # their encodes reach the observer
            out.append(
                [  # per prompt, every SAE's (``ActivationsPlan.result`` regroups them)
                    activations.prompt_activations(
                        ls, residuals[k + j][ls.hookpoint], plan.encoded[i], plan.req
                    )
                    for j, i in enumerate(part.indices)
                    for ls in timed
                ]
            )
            k += len(part.indices)
        return out

    # ---- SearchFeaturesByContrast ----------------------------------------------------------------
    def contrast(self, req: ContrastRequest) -> ContrastResult:
        ls = self.rt.get_sae(req.sae_id)
        top_n, per_hit = contrast.validate_request(req, self.limits)
        most = self.limits.max_contrast_prompts
        positive = prompts.encode_many(
            self.rt, req.positive, "positive", self.prompt_limits, max_prompts=most
        )
        spent = sum(len(e.ids) for e in positive)
        negative = prompts.encode_many(
            self.rt, req.negative, "negative", self.prompt_limits, max_prompts=most, spent=spent
        )
        encoded = positive + negative
        # One slice per forward: each takes the FIFO lock, so other calls run in between.
        residuals = activations.forward_residuals(
            self.rt,
            [e.ids for e in encoded],
            [ls.hookpoint],
            max_batch_tokens=min(self.max_batch_tokens, self.slice_tokens),
        )
        resid = [r[ls.hookpoint] for r in residuals]
        timed = self.rt.timed(ls)  # its encodes reach the observer
        sides = ([e.ids for e in negative], [e.ids for e in positive])  # for positive hits first

        def scorer(feats: list[int], strengths: list[float], positive_hits: bool) -> list[float]:
            prompts = sides[0] if positive_hits else sides[1]
            return output_scores(self.rt, ls, prompts, feats, strengths)

        return contrast.search(
            timed,
            resid,
            encoded,
            len(req.positive),
            req,
            top_n,
            per_hit,
            candidates=min(contrast.CANDIDATES_PER_HIT * top_n, self.limits.max_top_k),
            scorer=scorer,
        )

    # ---- GetFeature, ListFeatures, SearchFeatures ------------------------------------------------
    def feature(self, req: FeatureRequest) -> Feature:
        ls = self.rt.get_sae(req.sae_id)
        top_logits, neighbours = features.validate_request(ls, req, self.limits)
        page, per_bin = catalog.validate_feature_request(req, self.limits)
        result = features.feature_info(self.rt, ls, req, top_logits, neighbours)
        if ls.catalog is None:
            if req.examples_page_token:  # no pages exist: a token can only be a mistake
                raise InvalidArgument("examples_page_token", "this SAE has no catalog to page")
            return result
        part = catalog.feature_part(
            ls.catalog, req.feature, req.examples_page_token, page, per_bin, self.rt.token_text
        )
        return dataclasses.replace(result, **vars(part))

    def list_features(self, req: ListFeaturesRequest) -> FeaturePage:
        ls = self.rt.get_sae(req.sae_id)
        return catalog.list_features(ls.sae_id, ls.catalog, req, self.limits)

    def search_features(self, req: SearchFeaturesRequest) -> FeatureSearch:
        """BM25 over the catalog's text, fused with the features that fire most on the query's
        tokens, read in context (``_query_in_context``)."""
        ls = self.rt.get_sae(req.sae_id)
        top_n = catalog.validate_search(req, self.limits, self.prompt_limits.max_chars)
        peaks = self._query_peaks(ls, *self._query_in_context(ls, req.query))
        density = None if ls.log_density is None else ls.log_density.numpy()
        return catalog.search(ls.sae_id, ls.catalog, density, req.query, peaks, top_n)

    def _query_peaks(self, ls: LoadedSae, ids: list[int], special: list[bool]) -> np.ndarray:
        """Each feature's largest value ``(d_sae,)`` over the positions of ``ids`` it reads
        (not ``special``, not out of distribution)."""
        (resid,) = activations.forward_residuals(self.rt, [ids], [ls.hookpoint])
        x = resid[ls.hookpoint]  # (T, d_in)
        with torch.inference_mode():
            f = self.rt.encode(ls, x)  # (T, d_sae)
            read = ls.aggregation_mask(x, special, include_special=False)  # (T,)
            return activations.aggregate(f, read, "max").float().cpu().numpy()  # type: ignore[no-any-return]

    def _query_in_context(self, ls: LoadedSae, query: str) -> tuple[list[int], list[bool]]:
        """The ids a query is read at, and which of them are not read (``special``): a document
        boundary (BOS, else EOS) and ``QUERY_CONTEXT`` before the query, itself after a space.

        The SAE reads the query's tokens where it read text in training: mid-text, after a
        boundary, past the first positions it never saw. Alone at a sequence's start, a
        one-word query ("ocean") sits on the attention sink (left out: nothing matches), or
        right after a boundary, where document-start features outfire every topic feature.
        Measured on the default SAE (``bench/search_recall.py``, 150 features, the activation
        half alone, each queried by its label's top word): recall@10 0.52 read in context,
        0.10 right after a boundary, 0.02 alone."""
        tok = self.rt.tokenizer
        boundary = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        context = tok(QUERY_CONTEXT, add_special_tokens=False)["input_ids"]
        lead = [] if boundary is None else [int(boundary)]
        skip = positions.rules_of(ls.meta).skip_first
        lead = lead * max(1, skip - len(context)) + context
        text = query if query[:1].isspace() else " " + query
        enc = prompts.encode(self.rt, Prompt(text=text), "query", self.prompt_limits)
        return lead + enc.ids, [True] * len(lead) + enc.special_mask()

    # ---- AttributeFeatures -----------------------------------------------------------------------
    def attribute(self, req: AttributeRequest) -> Attribution:
        ls = self.rt.get_sae(req.sae_id)
        top_n = attribution.validate_request(req, self.limits)
        target = attribution.resolve_target(self.rt, req, self.prompt_limits)
        enc = prompts.encode(self.rt, req.prompt, "prompt", self.prompt_limits)
        size = attribution.response_bytes(enc, top_n)
        if size > self.limits.max_response_bytes:
            raise OutOfRange(
                "top_n",
                size,
                self.limits.max_response_bytes,
                f"bytes of response ({len(enc.ids)} tokens × top_n {top_n})",
            )
        return attribution.attribute(self.rt, ls, enc, target, top_n)

    # ---- GenerateSteered -------------------------------------------------------------------------
    def plan_generation(self, req: GenerateRequest) -> GenerationPlan:
        """Validate ``req`` completely and resolve it into what the batcher runs."""
        ls = self.rt.get_sae(req.sae_id)
        validate_interventions(ls, list(req.interventions), self.limits)
        enc = prompts.encode(self.rt, req.prompt, "prompt", self.prompt_limits)
        sampling = plan_sampling(
            req.sampling,
            self.limits,
            prompt_len=len(enc.ids),
            max_positions=self.rt.max_positions,
        )
        traced = distinct_features(list(req.interventions))
        branches: list[tuple[Branch, RowEdits]] = [
            ("steered", RowEdits(traced, list(req.interventions)))
        ]
        if req.include_baseline:
            # The baseline reads the same features (for its trace) but edits none.
            branches.append(("baseline", RowEdits(traced if req.include_trace else [])))
        return GenerationPlan(
            sae=ls,
            prompt=enc,
            sampling=sampling,
            branches=tuple(branches),
            include_logprobs=req.include_logprobs,
            include_trace=req.include_trace,
            trace_features=tuple(traced),
        )

    def validate_generate(self, req: GenerateRequest) -> None:
        """Raise the request's error now, before a stream starts."""
        self.plan_generation(req)

    def submit_generate(
        self, req: GenerateRequest, request_id: str | None = None
    ) -> GenerationHandle:
        """Validate and queue ``req`` on the decode batcher; iterate the handle for its events."""
        plan = self.plan_generation(req)
        self.batcher.start()
        return self.batcher.submit(plan, request_id)

    def generate(self, req: GenerateRequest) -> GenerationResult:
        """Blocking: the whole result (through the batcher, like every generation)."""
        return self.submit_generate(req).result()

    def generate_stream(self, req: GenerateRequest) -> Iterator[TokenEvent | GenerationResult]:
        """TokenEvents as tokens are decided, then the GenerationResult. Closing it cancels."""
        handle = self.submit_generate(req)
        return iter(handle)
