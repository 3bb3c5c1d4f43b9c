"""Protobuf at the SDK's edge: prompts and interventions into messages, responses into results.

The only module of the SDK that reads ``saescope_pb2`` responses; ``methods`` builds requests
with its helpers. Results are converted by shape (``saescope.api.v1.shapes``): a result
dataclass has its response message's field names, and enums become the vocabulary's words.
Written by hand is only what the shapes do not say: chats (a ``oneof``), packed
``DenseTensor``s, per-token activations (the SDK regroups the wire's columns by token) and a
stream's events.
"""

from __future__ import annotations

import dataclasses
import sys
from array import array
from collections.abc import Sequence
from typing import TypeVar

from google.protobuf.message import Message

from saescope.api.v1 import saescope_pb2 as pb
from saescope.api.v1.shapes import Codec, Shapes
from saescope.api.v1.vocabulary import AGGREGATION, ORDER_BY, Vocabulary, WireError
from saescope.client import results as r
from saescope.client.errors import InvalidArgument
from saescope.client.inputs import Chat, Intervention, PromptLike, as_chat, is_chat

T = TypeVar("T")


def invalid(field: str, message: str) -> InvalidArgument:
    """The SDK's own INVALID_ARGUMENT, raised before a call is sent."""
    return InvalidArgument("INVALID_ARGUMENT", f"{field}: {message}")


# ---- requests -----------------------------------------------------------------------------
def prompt(value: PromptLike, field: str, *, generation: bool = False) -> pb.Prompt:
    """A ``Prompt`` from text or a chat; chats get the assistant header by default when
    ``generation`` (the model should answer)."""
    if isinstance(value, str):
        return pb.Prompt(text=value)
    if not is_chat(value):
        raise invalid(field, f"expected a str or a chat (list of messages), got {value!r}")
    chat = as_chat(value)
    add_header = generation if chat.add_generation_prompt is None else chat.add_generation_prompt
    messages = [pb.ChatMessage(role=m.role, content=m.content) for m in chat.messages]
    return pb.Prompt(chat=pb.Chat(messages=messages, add_generation_prompt=add_header))


def prompts(values: PromptLike | Sequence[PromptLike], field: str) -> list[pb.Prompt]:
    """One prompt (text or chat) or a list of them."""
    if isinstance(values, str | Chat) or is_chat(values):
        return [prompt(values, f"{field}[0]")]  # type: ignore[arg-type]
    return [prompt(v, f"{field}[{i}]") for i, v in enumerate(values)]  # type: ignore[arg-type]


# ---- results ------------------------------------------------------------------------------
def dense(tensor: pb.DenseTensor, field: str = "") -> list[float]:
    """The flat values of a ``DenseTensor`` (little-endian float32), without numpy."""
    values = array("f", tensor.data)
    if sys.byteorder == "big":
        values.byteswap()
    return values.tolist()


def dense_message(values: Sequence[float]) -> pb.DenseTensor:
    """A ``DenseTensor`` of a flat sequence of floats (little-endian float32), without numpy."""
    packed = array("f", values)
    if sys.byteorder == "big":
        packed.byteswap()
    return pb.DenseTensor(shape=[len(packed)], data=packed.tobytes())


SHAPES = Shapes(
    {"saescope.api.v1.DenseTensor": Codec(decode=dense, encode=dense_message)}, lenient=True
)


def result(message: Message, cls: type[T]) -> T:
    """The result ``cls`` of a response, by shape."""
    return SHAPES.decode(message, cls)


def _sparse(s: pb.SparseFeatures) -> list[r.FeatureValue]:
    return [r.FeatureValue(f, v) for f, v in zip(s.features, s.values, strict=True)]


def prompt_activations(p: pb.PromptActivations, feature_ids: list[int]) -> r.PromptActivations:
    """One prompt's activations, regrouped by token."""
    n_tokens, n_features = len(p.tokens), len(feature_ids)
    flat = dense(p.feature_values) if n_features else []
    if len(flat) != n_tokens * n_features:
        raise ValueError(f"feature_values: {len(flat)} values for {n_tokens}×{n_features}")
    per_token = [_sparse(s) for s in p.token_top_features] or [[] for _ in p.tokens]
    rows = [
        r.TokenActivations(
            token=result(t, r.Token),
            top_features=per_token[i],
            feature_values=flat[i * n_features : (i + 1) * n_features],
            error_norm=p.error_norms[i] if i < len(p.error_norms) else 0.0,
            residual_norm=p.residual_norms[i] if i < len(p.residual_norms) else 0.0,
            out_of_distribution=i < len(p.out_of_distribution) and p.out_of_distribution[i],
        )
        for i, t in enumerate(p.tokens)
    ]
    return r.PromptActivations(
        tokens=rows, feature_ids=list(feature_ids), top_features=_sparse(p.top_features)
    )


def activations(m: pb.GetFeatureActivationsResponse, feature_ids: list[int]) -> r.Activations:
    return r.Activations(
        sae_id=m.sae_id, prompts=[prompt_activations(p, feature_ids) for p in m.prompts]
    )


def activations_by_sae(
    m: pb.GetFeatureActivationsResponse, feature_ids: list[int]
) -> dict[str, r.Activations]:
    """Each SAE's activations (a call with ``sae_ids``), by sae_id in request order."""
    return {
        s.sae_id: r.Activations(
            sae_id=s.sae_id, prompts=[prompt_activations(p, feature_ids) for p in s.prompts]
        )
        for s in m.by_sae
    }


def event(m: pb.GenerateSteeredEvent, logprobs: bool) -> r.TokenEvent | r.GenerationResult:
    """A streamed event: a ``TokenEvent``, or the final ``GenerationResult``."""
    if m.WhichOneof("event") == "done":
        return result(m.done, r.GenerationResult)
    token = result(m.token, r.TokenEvent)
    return token if logprobs else dataclasses.replace(token, logprob=None)


def aggregation(name: str, field: str = "aggregation") -> pb.Aggregation.ValueType:
    """The wire number of an aggregation word."""
    return pb.Aggregation.ValueType(_number(AGGREGATION, name, field))


def order_by(name: str) -> pb.SearchFeaturesByContrastRequest.OrderBy.ValueType:
    """The wire number of a contrast ordering's word."""
    return pb.SearchFeaturesByContrastRequest.OrderBy.ValueType(_number(ORDER_BY, name, "order_by"))


def _number(vocabulary: Vocabulary, word: str, field: str) -> int:
    try:
        return vocabulary.number(word, field)
    except WireError as e:
        raise invalid(e.field, e.message) from None


def intervention(edit: Intervention) -> pb.Intervention:
    """An ``Intervention`` message (the dataclass has the message's fields)."""
    return SHAPES.encode(edit, pb.Intervention)
