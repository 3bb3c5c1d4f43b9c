"""Protobuf at the SDK's edge: requests built from keyword arguments, results from responses.

The only module of the SDK that touches ``saescope_pb2`` message types; ``Client`` and
``AsyncClient`` share it, so both build identical requests.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterable, Sequence

from saescope.api.v1 import saescope_pb2 as pb
from saescope.client import results as r
from saescope.client.errors import InvalidArgument
from saescope.client.inputs import (
    AGGREGATIONS,
    Chat,
    InterventionLike,
    PromptLike,
    as_chat,
    as_intervention,
    is_chat,
)

_AGGREGATION = {"max": pb.AGGREGATION_MAX, "mean": pb.AGGREGATION_MEAN, "sum": pb.AGGREGATION_SUM}
_MODE = {
    "clamp": pb.Intervention.MODE_CLAMP,
    "add": pb.Intervention.MODE_ADD,
    "multiply": pb.Intervention.MODE_MULTIPLY,
    "ablate": pb.Intervention.MODE_ABLATE,
}
_SCOPE = {
    "all": pb.Intervention.SCOPE_ALL,
    "prompt": pb.Intervention.SCOPE_PROMPT,
    "generated": pb.Intervention.SCOPE_GENERATED,
}
_FINISH: dict[int, r.FinishReason] = {
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_EOS: "eos",
    pb.FINISH_REASON_STOP: "stop",
}


def _invalid(field: str, message: str) -> InvalidArgument:
    return InvalidArgument("INVALID_ARGUMENT", f"{field}: {message}")


# ---- requests -----------------------------------------------------------------------------
def prompt(value: PromptLike, field: str, *, generation: bool = False) -> pb.Prompt:
    """A ``Prompt`` from text or a chat; chats get the assistant header by default when
    ``generation`` (the model should answer)."""
    if isinstance(value, str):
        return pb.Prompt(text=value)
    if not is_chat(value):
        raise _invalid(field, f"expected a str or a chat (list of messages), got {value!r}")
    chat = as_chat(value)
    add_header = generation if chat.add_generation_prompt is None else chat.add_generation_prompt
    messages = [pb.ChatMessage(role=m.role, content=m.content) for m in chat.messages]
    return pb.Prompt(chat=pb.Chat(messages=messages, add_generation_prompt=add_header))


def prompts(values: PromptLike | Sequence[PromptLike], field: str) -> list[pb.Prompt]:
    """One prompt (text or chat) or a list of them."""
    if isinstance(values, str | Chat) or is_chat(values):
        return [prompt(values, f"{field}[0]")]  # type: ignore[arg-type]
    return [prompt(v, f"{field}[{i}]") for i, v in enumerate(values)]  # type: ignore[arg-type]


def aggregation(name: str, field: str = "aggregation") -> pb.Aggregation.ValueType:
    try:
        return _AGGREGATION[name]
    except KeyError:
        raise _invalid(field, f"{name!r} is not one of {AGGREGATIONS}") from None


def tokenize_request(value: PromptLike | None, chat: PromptLike | None) -> pb.TokenizeRequest:
    """``tokenize(prompt)`` or ``tokenize(chat=...)``: exactly one of the two."""
    if (value is None) == (chat is None):
        raise _invalid("prompt", "give either a prompt or chat=")
    if chat is not None and not is_chat(chat):
        raise _invalid("chat", f"expected a list of messages, got {chat!r}")
    return pb.TokenizeRequest(prompt=prompt(value if value is not None else chat, "prompt"))  # type: ignore[arg-type]


def activations_request(
    values: PromptLike | Sequence[PromptLike],
    *,
    sae_id: str | None,
    top_k: int,
    features: Iterable[int],
    top_k_aggregated: int,
    aggregation_: str,
    include_special_tokens: bool,
) -> pb.GetFeatureActivationsRequest:
    return pb.GetFeatureActivationsRequest(
        sae_id=sae_id or "",
        prompts=prompts(values, "prompts"),
        top_k_per_token=top_k,
        feature_ids=list(features),
        top_k_aggregated=top_k_aggregated,
        aggregation=aggregation(aggregation_),
        include_special_tokens=include_special_tokens,
    )


def generate_request(
    value: PromptLike,
    *,
    sae_id: str | None,
    interventions: Iterable[InterventionLike],
    max_new_tokens: int | None,
    temperature: float,
    top_p: float | None,
    top_k: int | None,
    seed: int | None,
    stop: str | Sequence[str],
    baseline: bool,
    logprobs: bool,
    trace: bool,
) -> pb.GenerateSteeredRequest:
    edits = []
    for item in interventions:
        edit = as_intervention(item)
        edits.append(
            pb.Intervention(
                feature=edit.feature,
                mode=_MODE[edit.mode],
                value=edit.value,
                scope=_SCOPE[edit.scope],
            )
        )
    sampling = pb.SamplingParams(
        max_new_tokens=max_new_tokens or 0,
        temperature=temperature,
        top_p=top_p or 0.0,
        top_k=top_k or 0,
        stop=[stop] if isinstance(stop, str) else list(stop),
    )
    if seed is not None:
        sampling.seed = seed
    return pb.GenerateSteeredRequest(
        sae_id=sae_id or "",
        prompt=prompt(value, "prompt", generation=True),
        interventions=edits,
        sampling=sampling,
        include_baseline=baseline,
        include_logprobs=logprobs,
        include_trace=trace,
    )


def contrast_request(
    positive: Sequence[PromptLike],
    negative: Sequence[PromptLike],
    *,
    sae_id: str | None,
    aggregation_: str,
    top_n: int,
    locations: int,
) -> pb.SearchFeaturesByContrastRequest:
    return pb.SearchFeaturesByContrastRequest(
        sae_id=sae_id or "",
        positive=prompts(positive, "positive"),
        negative=prompts(negative, "negative"),
        aggregation=aggregation(aggregation_),
        top_n=top_n,
        locations_per_hit=locations,
    )


def feature_request(
    feature_id: int, *, sae_id: str | None, top_logits: int, neighbours: int, direction: bool
) -> pb.GetFeatureRequest:
    return pb.GetFeatureRequest(
        sae_id=sae_id or "",
        feature=feature_id,
        top_logits=top_logits,
        neighbours=neighbours,
        include_direction=direction,
    )


# ---- results ------------------------------------------------------------------------------
def dense(tensor: pb.DenseTensor) -> list[float]:
    """The flat values of a ``DenseTensor`` (little-endian float32), without numpy."""
    values = array("f", tensor.data)
    if sys.byteorder == "big":
        values.byteswap()
    return values.tolist()


def token(t: pb.Token) -> r.Token:
    return r.Token(id=t.id, text=t.text, start=t.start, end=t.end, special=t.special)


def tokens(ts: Iterable[pb.Token]) -> list[r.Token]:
    return [token(t) for t in ts]


def sparse(s: pb.SparseFeatures) -> list[r.FeatureValue]:
    return [r.FeatureValue(f, v) for f, v in zip(s.features, s.values, strict=True)]


def info(m: pb.GetInfoResponse) -> r.Info:
    saes = [
        r.SaeInfo(
            sae_id=s.sae_id,
            hookpoint=s.hookpoint,
            layer=s.layer,
            d_in=s.d_in,
            d_sae=s.d_sae,
            architecture=s.architecture,
            k=s.k,
            metrics=dict(s.metrics),
            tokens_seen=s.tokens_seen,
            has_catalog=s.has_catalog,
        )
        for s in m.saes
    ]
    lim = m.limits
    limits = r.Limits(
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
    )
    return r.Info(
        model=m.model,
        dtype=m.dtype,
        device=m.device,
        num_layers=m.num_layers,
        d_model=m.d_model,
        vocab_size=m.vocab_size,
        has_chat_template=m.has_chat_template,
        saes=saes,
        default_sae_id=m.default_sae_id,
        limits=limits,
        version=m.version,
    )


def tokenization(m: pb.TokenizeResponse) -> r.Tokenization:
    return r.Tokenization(text=m.text, tokens=tokens(m.tokens))


def prompt_activations(p: pb.PromptActivations, feature_ids: list[int]) -> r.PromptActivations:
    n_tokens, n_features = len(p.tokens), len(feature_ids)
    flat = dense(p.feature_values) if n_features else []
    if len(flat) != n_tokens * n_features:
        raise ValueError(f"feature_values: {len(flat)} values for {n_tokens}×{n_features}")
    per_token = [sparse(s) for s in p.token_top_features] or [[] for _ in p.tokens]
    rows = [
        r.TokenActivations(
            token=token(t),
            top_features=per_token[i],
            feature_values=flat[i * n_features : (i + 1) * n_features],
            error_norm=p.error_norms[i] if i < len(p.error_norms) else 0.0,
            residual_norm=p.residual_norms[i] if i < len(p.residual_norms) else 0.0,
            out_of_distribution=i < len(p.out_of_distribution) and p.out_of_distribution[i],
        )
        for i, t in enumerate(p.tokens)
    ]
    return r.PromptActivations(
        tokens=rows, feature_ids=list(feature_ids), top_features=sparse(p.top_features)
    )


def activations(m: pb.GetFeatureActivationsResponse, feature_ids: list[int]) -> r.Activations:
    return r.Activations(
        sae_id=m.sae_id, prompts=[prompt_activations(p, feature_ids) for p in m.prompts]
    )


def completion(c: pb.Completion) -> r.Completion:
    return r.Completion(
        text=c.text,
        tokens=tokens(c.tokens),
        logprobs=list(c.logprobs),
        finish_reason=_FINISH.get(c.finish_reason, "unspecified"),
        trace=[r.FeatureTrace(t.feature, list(t.original), list(t.steered)) for t in c.trace],
    )


def generation(m: pb.GenerateSteeredResponse) -> r.GenerationResult:
    return r.GenerationResult(
        sae_id=m.sae_id,
        prompt_tokens=tokens(m.prompt_tokens),
        steered=completion(m.steered),
        baseline=completion(m.baseline) if m.HasField("baseline") else None,
    )


def event(m: pb.GenerateSteeredEvent, logprobs: bool) -> r.TokenEvent | r.GenerationResult:
    """A streamed event: a ``TokenEvent``, or the final ``GenerationResult``."""
    if m.WhichOneof("event") == "done":
        return generation(m.done)
    e = m.token
    return r.TokenEvent(
        branch="baseline" if e.branch == pb.GenerateSteeredEvent.BRANCH_BASELINE else "steered",
        index=e.index,
        token=token(e.token),
        text=e.text,
        logprob=e.logprob if logprobs else None,
        trace=list(e.trace),
    )


def _hit(h: pb.ContrastHit) -> r.ContrastHit:
    return r.ContrastHit(
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
            r.FeatureLocation(x.positive, x.prompt_index, x.token_index, x.token, x.value)
            for x in h.locations
        ],
    )


def contrast(m: pb.SearchFeaturesByContrastResponse) -> r.ContrastResult:
    return r.ContrastResult(
        sae_id=m.sae_id,
        positive_hits=[_hit(h) for h in m.positive_hits],
        negative_hits=[_hit(h) for h in m.negative_hits],
        features_tested=m.features_tested,
    )


def feature(m: pb.GetFeatureResponse) -> r.Feature:
    return r.Feature(
        sae_id=m.sae_id,
        feature=m.feature,
        decoder_norm=m.decoder_norm,
        encoder_norm=m.encoder_norm,
        encoder_bias=m.encoder_bias,
        density=m.density if m.HasField("density") else None,
        promoted=[r.TokenScore(t.id, t.token, t.score) for t in m.promoted],
        suppressed=[r.TokenScore(t.id, t.token, t.score) for t in m.suppressed],
        nearest=[r.Neighbour(n.feature, n.cosine) for n in m.nearest],
        top_examples=[
            r.ActivatingExample(tokens(x.tokens), list(x.values), x.max_value)
            for x in m.top_examples
        ],
        direction=dense(m.direction) if m.HasField("direction") else None,
    )
