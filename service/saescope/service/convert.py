"""Protobuf ⇄ domain types: the only module besides the app that knows ``saescope.api.v1``.

Requests come in as wire messages and leave as the engine's domain types (``types.py``); results
go the other way. Enums become names, and what only the wire can get wrong is an
``InvalidArgument`` naming the field: an unset oneof (``prompts[2]``), an unset or unknown enum
(``interventions[0].mode``). Scalars pass through as sent: the engine validates them, applies
the .proto's "0 means the default" rules and checks the configured limits. Dense arrays travel
as packed little-endian float32 bytes plus their shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np

from saescope.api.v1 import saescope_pb2 as pb
from saescope.service import types as t
from saescope.service.errors import InvalidArgument

_AGGREGATIONS: dict[int, t.Aggregation] = {
    pb.AGGREGATION_UNSPECIFIED: "max",
    pb.AGGREGATION_MAX: "max",
    pb.AGGREGATION_MEAN: "mean",
    pb.AGGREGATION_SUM: "sum",
}
_MODES: dict[int, t.InterventionMode] = {
    pb.Intervention.MODE_CLAMP: "clamp",
    pb.Intervention.MODE_ADD: "add",
    pb.Intervention.MODE_MULTIPLY: "multiply",
    pb.Intervention.MODE_ABLATE: "ablate",
}
_SCOPES: dict[int, t.InterventionScope] = {
    pb.Intervention.SCOPE_ALL: "all",
    pb.Intervention.SCOPE_PROMPT: "prompt",
    pb.Intervention.SCOPE_GENERATED: "generated",
}
_FINISH: dict[str, pb.FinishReason.ValueType] = {
    "length": pb.FINISH_REASON_LENGTH,
    "eos": pb.FINISH_REASON_EOS,
    "stop": pb.FINISH_REASON_STOP,
}
_BRANCH: dict[str, pb.GenerateSteeredEvent.Branch.ValueType] = {
    "steered": pb.GenerateSteeredEvent.BRANCH_STEERED,
    "baseline": pb.GenerateSteeredEvent.BRANCH_BASELINE,
}
V = TypeVar("V")


# ---- dense tensors ----------------------------------------------------------------------------
def dense_to_proto(array: np.ndarray) -> pb.DenseTensor:
    """Row-major little-endian float32 bytes plus the shape."""
    data = np.ascontiguousarray(array, dtype="<f4")
    return pb.DenseTensor(shape=list(data.shape), data=data.tobytes())


def dense_from_proto(tensor: pb.DenseTensor, field: str = "tensor") -> np.ndarray:
    shape = tuple(int(s) for s in tensor.shape)
    if any(s < 0 for s in shape) or len(tensor.data) != 4 * int(np.prod(shape, dtype=np.int64)):
        raise InvalidArgument(field, f"{len(tensor.data)} bytes do not hold float32 {shape}")
    return np.frombuffer(tensor.data, dtype="<f4").reshape(shape).astype(np.float32)


# ---- requests: wire → domain ------------------------------------------------------------------
def prompt_from_proto(prompt: pb.Prompt, field: str) -> t.Prompt:
    kind = prompt.WhichOneof("kind")
    if kind == "text":
        return t.Prompt(text=prompt.text)
    if kind == "chat":
        messages = tuple(t.ChatMessage(m.role, m.content) for m in prompt.chat.messages)
        return t.Prompt(chat=messages, add_generation_prompt=prompt.chat.add_generation_prompt)
    raise InvalidArgument(field, "set either text or chat")


def _prompts(prompts: Sequence[pb.Prompt], field: str) -> list[t.Prompt]:
    return [prompt_from_proto(p, f"{field}[{i}]") for i, p in enumerate(prompts)]


def _lookup(table: dict[int, V], value: int, field: str) -> V:
    """An enum value's domain name; values this server does not know are the caller's error."""
    if value not in table:
        raise InvalidArgument(field, f"unknown value {value}")
    return table[value]


def tokenize_request(req: pb.TokenizeRequest) -> t.Prompt:
    if not req.HasField("prompt"):
        raise InvalidArgument("prompt", "required")
    return prompt_from_proto(req.prompt, "prompt")


def activations_request(req: pb.GetFeatureActivationsRequest) -> t.ActivationsRequest:
    if not req.prompts:
        raise InvalidArgument("prompts", "at least one prompt is required")
    return t.ActivationsRequest(
        prompts=_prompts(req.prompts, "prompts"),
        sae_id=req.sae_id,
        top_k_per_token=req.top_k_per_token,
        feature_ids=list(req.feature_ids),
        top_k_aggregated=req.top_k_aggregated,
        aggregation=_lookup(_AGGREGATIONS, req.aggregation, "aggregation"),
        include_special_tokens=req.include_special_tokens,
    )


def _intervention(iv: pb.Intervention, field: str) -> t.Intervention:
    if iv.mode == pb.Intervention.MODE_UNSPECIFIED:
        raise InvalidArgument(f"{field}.mode", "required (clamp, add, multiply or ablate)")
    mode = _lookup(_MODES, iv.mode, f"{field}.mode")
    scope = _lookup(_SCOPES, iv.scope, f"{field}.scope")
    return t.Intervention(feature=iv.feature, mode=mode, value=iv.value, scope=scope)


def _sampling(s: pb.SamplingParams) -> t.Sampling:
    return t.Sampling(
        max_new_tokens=s.max_new_tokens,
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        seed=s.seed if s.HasField("seed") else None,
        stop=tuple(s.stop),
    )


def generate_request(req: pb.GenerateSteeredRequest) -> t.GenerateRequest:
    if not req.HasField("prompt"):
        raise InvalidArgument("prompt", "required")
    return t.GenerateRequest(
        prompt=prompt_from_proto(req.prompt, "prompt"),
        sae_id=req.sae_id,
        interventions=[
            _intervention(iv, f"interventions[{i}]") for i, iv in enumerate(req.interventions)
        ],
        sampling=_sampling(req.sampling),
        include_baseline=req.include_baseline,
        include_logprobs=req.include_logprobs,
        include_trace=req.include_trace,
    )


def contrast_request(req: pb.SearchFeaturesByContrastRequest) -> t.ContrastRequest:
    return t.ContrastRequest(
        positive=_prompts(req.positive, "positive"),
        negative=_prompts(req.negative, "negative"),
        sae_id=req.sae_id,
        aggregation=_lookup(_AGGREGATIONS, req.aggregation, "aggregation"),
        top_n=req.top_n,
        locations_per_hit=req.locations_per_hit,
    )


def feature_request(req: pb.GetFeatureRequest) -> t.FeatureRequest:
    return t.FeatureRequest(
        feature=req.feature,
        sae_id=req.sae_id,
        top_logits=req.top_logits,
        neighbours=req.neighbours,
        include_direction=req.include_direction,
    )


# ---- results: domain → wire -------------------------------------------------------------------
def token_to_proto(tok: t.Token) -> pb.Token:
    return pb.Token(id=tok.id, text=tok.text, start=tok.start, end=tok.end, special=tok.special)


def _tokens(tokens: Sequence[t.Token]) -> list[pb.Token]:
    return [token_to_proto(tok) for tok in tokens]


def _sparse(s: t.Sparse) -> pb.SparseFeatures:
    return pb.SparseFeatures(features=s.features, values=s.values)


def info_response(info: t.Info) -> pb.GetInfoResponse:
    saes = [
        pb.SaeInfo(
            sae_id=s.sae_id,
            hookpoint=s.hookpoint,
            layer=s.layer,
            d_in=s.d_in,
            d_sae=s.d_sae,
            architecture=s.architecture,
            k=s.k,
            metrics=s.metrics,
            tokens_seen=s.tokens_seen,
            has_catalog=s.has_catalog,
        )
        for s in info.saes
    ]
    lim = info.limits
    return pb.GetInfoResponse(
        model=info.model,
        dtype=info.dtype,
        device=info.device,
        num_layers=info.num_layers,
        d_model=info.d_model,
        vocab_size=info.vocab_size,
        has_chat_template=info.has_chat_template,
        saes=saes,
        default_sae_id=info.default_sae_id,
        limits=pb.Limits(
            max_prompts=lim.max_prompts,
            max_tokens_per_prompt=lim.max_tokens_per_prompt,
            max_top_k=lim.max_top_k,
            max_new_tokens=lim.max_new_tokens,
            max_features=lim.max_features,
            max_contrast_prompts=lim.max_contrast_prompts,
            max_stop_strings=lim.max_stop_strings,
            max_stop_string_chars=lim.max_stop_string_chars,
            max_tokens_per_call=lim.max_tokens_per_call,
            max_response_bytes=lim.max_response_bytes,
        ),
        version=info.version,
    )


def tokenize_response(tok: t.Tokenized) -> pb.TokenizeResponse:
    return pb.TokenizeResponse(text=tok.text, tokens=_tokens(tok.tokens))


def activations_response(res: t.ActivationsResult) -> pb.GetFeatureActivationsResponse:
    prompts = [
        pb.PromptActivations(
            tokens=_tokens(p.tokens),
            token_top_features=[_sparse(s) for s in p.token_top_features],
            feature_values=dense_to_proto(p.feature_values),
            top_features=_sparse(p.top_features),
            error_norms=p.error_norms,
            residual_norms=p.residual_norms,
            out_of_distribution=p.out_of_distribution,
        )
        for p in res.prompts
    ]
    return pb.GetFeatureActivationsResponse(sae_id=res.sae_id, prompts=prompts)


def _completion(c: t.Completion) -> pb.Completion:
    return pb.Completion(
        text=c.text,
        tokens=_tokens(c.tokens),
        logprobs=c.logprobs,
        finish_reason=_FINISH[c.finish_reason],
        trace=[
            pb.FeatureTrace(feature=tr.feature, original=tr.original, steered=tr.steered)
            for tr in c.trace
        ],
    )


def generate_response(res: t.GenerateResult) -> pb.GenerateSteeredResponse:
    out = pb.GenerateSteeredResponse(
        sae_id=res.sae_id,
        prompt_tokens=_tokens(res.prompt_tokens),
        steered=_completion(res.steered),
    )
    if res.baseline is not None:
        out.baseline.CopyFrom(_completion(res.baseline))
    return out


def generate_event(item: t.TokenEvent | t.GenerateResult) -> pb.GenerateSteeredEvent:
    """A streamed token, or (for the final result) the ``done`` event."""
    if isinstance(item, t.GenerateResult):
        return pb.GenerateSteeredEvent(done=generate_response(item))
    token = pb.GenerateSteeredEvent.TokenEvent(
        branch=_BRANCH[item.branch],
        index=item.index,
        token=token_to_proto(item.token),
        text=item.text,
        logprob=item.logprob or 0.0,
        trace=item.trace,
    )
    return pb.GenerateSteeredEvent(token=token)


def _hit(h: t.ContrastHit) -> pb.ContrastHit:
    return pb.ContrastHit(
        feature=h.feature,
        mean_positive=h.mean_positive,
        mean_negative=h.mean_negative,
        mean_difference=h.mean_difference,
        effect_size=h.effect_size,
        auroc=h.auroc,
        p_value=h.p_value,
        p_value_corrected=h.p_value_corrected,
        frac_active_positive=h.frac_active_positive,
        frac_active_negative=h.frac_active_negative,
        locations=[
            pb.FeatureLocation(
                positive=loc.positive,
                prompt_index=loc.prompt_index,
                token_index=loc.token_index,
                token=loc.token,
                value=loc.value,
            )
            for loc in h.locations
        ],
    )


def contrast_response(res: t.ContrastResult) -> pb.SearchFeaturesByContrastResponse:
    return pb.SearchFeaturesByContrastResponse(
        sae_id=res.sae_id,
        positive_hits=[_hit(h) for h in res.positive_hits],
        negative_hits=[_hit(h) for h in res.negative_hits],
        features_tested=res.features_tested,
    )


def feature_response(res: t.FeatureResult) -> pb.GetFeatureResponse:
    out = pb.GetFeatureResponse(
        sae_id=res.sae_id,
        feature=res.feature,
        decoder_norm=res.decoder_norm,
        encoder_norm=res.encoder_norm,
        encoder_bias=res.encoder_bias,
        promoted=[pb.TokenScore(id=s.id, token=s.token, score=s.score) for s in res.promoted],
        suppressed=[pb.TokenScore(id=s.id, token=s.token, score=s.score) for s in res.suppressed],
        nearest=[pb.Neighbour(feature=f, cosine=c) for f, c in res.nearest],
        top_examples=[
            pb.ActivatingExample(tokens=_tokens(e.tokens), values=e.values, max_value=e.max_value)
            for e in res.top_examples
        ],
    )
    if res.density is not None:
        out.density = res.density
    if res.direction is not None:
        out.direction.CopyFrom(dense_to_proto(res.direction))
    return out
