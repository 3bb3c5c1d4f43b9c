"""The reliability probe's hand-made bad-input classes, one per way a caller can get it wrong.

Each :class:`Case` is one request (a message, or raw bytes for what no well-behaved client can
send), the status code the API promises for it (README "From another language", the .proto's
conventions) and what the details must name. Codes: INVALID_ARGUMENT naming the field,
OUT_OF_RANGE naming the limit's field, NOT_FOUND for an unknown ``sae_id`` or feature,
RESOURCE_EXHAUSTED for a message over 4 MiB (``wire_limits``), UNAUTHENTICATED /
PERMISSION_DENIED for access, DEADLINE_EXCEEDED; a few edge cases that the contract defines as
valid (``top_p`` 0 means 1, unknown fields are ignored, any chat role the template renders) must
be OK.

The numbers come from the service itself (:class:`Context`: GetInfo's limits and SAEs, and a
prompt calibrated with Tokenize to just fit ``max_tokens_per_prompt``), so the cases hold for
any limits. Cases on the ``strict`` app (an API key, one request at a time, small per-call
budgets: see ``reliability_probe.strict_overrides``) reach the key checks and the per-call token
and response budgets.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import grpc
from google.protobuf.message import Message

from saescope.api.v1 import saescope_pb2 as pb

Code = grpc.StatusCode
IA, OOR, NF = Code.INVALID_ARGUMENT, Code.OUT_OF_RANGE, Code.NOT_FOUND
Iv = pb.Intervention
Metadata = tuple[tuple[str, str], ...]
NAN, INF = float("nan"), float("inf")
WIRE_LIMIT = 4 * 2**20  # saescope.service.wire_limits.MAX_MESSAGE_BYTES (no service import here)
BIG_TEXT_CHARS = 3 * 2**20  # under the wire limit, far over any prompt's character bound
HUGE_ID_CHARS = 100_000  # an unknown sae_id is echoed in details: they must stay small


@dataclass(frozen=True)
class Context:
    """What the cases are built from: the service's own numbers and the calls' metadata."""

    limits: pb.Limits
    d_sae: dict[str, int]  # sae_id → d_sae
    default_sae_id: str
    metadata: Metadata  # the main app's
    strict_metadata: Metadata  # the strict app's, with a valid key
    strict_app: str
    near_limit_text: str  # just fits max_tokens_per_prompt
    over_limit_text: str  # one repetition more: just over it
    remote_target: str | None = None  # a non-loopback address of the proxy, if any

    @property
    def other_sae_id(self) -> str:
        return next((s for s in self.d_sae if s != self.default_sae_id), self.default_sae_id)


@dataclass(frozen=True)
class Case:
    """One bad-input class: a request and the answer the API promises."""

    rpc: str
    name: str
    build: Callable[[], Message | bytes]  # built when called (some are megabytes)
    expected: grpc.StatusCode
    needle: str | None  # what the details must name; None: nothing to name
    metadata: Metadata
    target: str | None = None  # None: the instance's gRPC target
    timeout: float = 60.0


# ---- request builders ----------------------------------------------------------------------------
def text(s: str) -> pb.Prompt:
    return pb.Prompt(text=s)


def chat(*messages: tuple[str, str], add_generation_prompt: bool = False) -> pb.Prompt:
    msgs = [pb.ChatMessage(role=r, content=c) for r, c in messages]
    return pb.Prompt(chat=pb.Chat(messages=msgs, add_generation_prompt=add_generation_prompt))


def tok(prompt: pb.Prompt | None = None) -> pb.TokenizeRequest:
    return pb.TokenizeRequest(prompt=prompt) if prompt is not None else pb.TokenizeRequest()


def acts(**kw: Any) -> pb.GetFeatureActivationsRequest:
    return pb.GetFeatureActivationsRequest(**{"prompts": [text("Hello world")], **kw})


def gen(**kw: Any) -> pb.GenerateSteeredRequest:
    sampling = pb.SamplingParams(max_new_tokens=4)  # cases are about refusals: keep OKs short
    return pb.GenerateSteeredRequest(**{"prompt": text("Hello"), "sampling": sampling, **kw})


def samp(**kw: Any) -> pb.SamplingParams:
    return pb.SamplingParams(**{"max_new_tokens": 4, **kw})


def gen_sampling(**kw: Any) -> pb.GenerateSteeredRequest:
    return gen(sampling=samp(**kw))


def gen_edit(**kw: Any) -> pb.GenerateSteeredRequest:
    """A generation with one intervention (``iv``'s arguments)."""
    return gen(interventions=[iv(**kw)])


def iv(feature: int = 1, mode: int = Iv.MODE_CLAMP, value: float = 1.0, scope: int = 0) -> Any:
    return Iv(feature=feature, mode=mode, value=value, scope=scope)  # type: ignore[arg-type]


def contrast(pos: int = 2, neg: int = 2, **kw: Any) -> pb.SearchFeaturesByContrastRequest:
    fields: dict[str, Any] = {
        "positive": [text(f"I love Paris {i}") for i in range(pos)],
        "negative": [text(f"The cat sat {i}") for i in range(neg)],
    }
    return pb.SearchFeaturesByContrastRequest(**(fields | kw))


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field_bytes(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2), as protobuf encodes strings and messages."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def oversized(rpc_request: Message) -> bytes:
    """``rpc_request`` plus an unknown field of padding: a valid message over the 4 MiB bound."""
    return rpc_request.SerializeToString() + field_bytes(999, b"x" * (WIRE_LIMIT + 1024))


def bad_utf8_text(field_number: int = 1) -> bytes:
    """A Prompt whose ``text`` is not UTF-8, inside field ``field_number`` of a request."""
    return field_bytes(field_number, field_bytes(1, b"\xff\xfe\xfd\xfc"))


TRUNCATED = b"\x0a\xff\xff\xff\x0f"  # a length prefix of 4 GiB, then nothing
CORRUPT = b"\xff\xff\xff\xff"  # field number 0 / a varint that never ends


# ---- the classes ---------------------------------------------------------------------------------
def cases(ctx: Context) -> list[Case]:
    """Every bad-input class, in RPC order (GetInfo, Tokenize, …, GetFeature, AttributeFeatures)."""
    L = ctx.limits
    md, strict = ctx.metadata, ctx.strict_metadata
    app_only = ((k, v) for k, v in strict if k == "application")
    strict_nokey: Metadata = tuple(app_only)
    d_sae = ctx.d_sae[ctx.default_sae_id]
    other = ctx.other_sae_id
    near, over = ctx.near_limit_text, ctx.over_limit_text
    two_thirds = near[: len(near) * 2 // 3]  # two of these: under the character bound, over tokens
    out: list[Case] = []

    def add(
        rpc: str,
        name: str,
        build: Callable[[], Message | bytes],
        expected: grpc.StatusCode,
        needle: str | None,
        *,
        metadata: Metadata | None = None,
        target: str | None = None,
        timeout: float = 60.0,
    ) -> None:
        out.append(Case(rpc, name, build, expected, needle, metadata or md, target, timeout))

    # ---- GetInfo: access, routing, the wire ----
    R = "GetInfo"
    add(R, "unknown fields (forward compatibility)", lambda: b"\x08\x01\x12\x03abc", Code.OK, None)
    add(R, "malformed protobuf: truncated length", lambda: TRUNCATED, IA, "request")
    add(
        R,
        "message over 4 MiB",
        lambda: oversized(pb.GetInfoRequest()),
        Code.RESOURCE_EXHAUSTED,
        "larger than max",
    )
    add(
        R,
        "metadata: unknown application",
        pb.GetInfoRequest,
        NF,
        "application",
        metadata=(("application", "no-such-app"),),
    )
    add(
        R,
        "metadata: no application (two apps deployed)",
        pb.GetInfoRequest,
        NF,
        "application",
        metadata=(("x-unrelated", "1"),),
    )
    add(
        R,
        "metadata: application name of 7,000 characters",
        pb.GetInfoRequest,
        NF,
        "application",
        metadata=(("application", "z" * 7000),),
    )
    add(
        R,
        "metadata: API key missing",
        pb.GetInfoRequest,
        Code.UNAUTHENTICATED,
        "API key",
        metadata=strict_nokey,
    )
    add(
        R,
        "metadata: wrong x-api-key",
        pb.GetInfoRequest,
        Code.UNAUTHENTICATED,
        "not valid",
        metadata=(*strict_nokey, ("x-api-key", "wrong-key")),
    )
    add(
        R,
        "metadata: empty x-api-key",
        pb.GetInfoRequest,
        Code.UNAUTHENTICATED,
        "API key",
        metadata=(*strict_nokey, ("x-api-key", "")),
    )
    add(
        R,
        "metadata: authorization not Bearer",
        pb.GetInfoRequest,
        Code.UNAUTHENTICATED,
        "API key",
        metadata=(*strict_nokey, ("authorization", "Basic dXNlcjpwYXNz")),
    )
    if ctx.remote_target is not None:
        add(
            R,
            "caller not on loopback, no key configured",
            pb.GetInfoRequest,
            Code.PERMISSION_DENIED,
            "loopback",
            target=ctx.remote_target,
        )

    # ---- Tokenize: prompts ----
    R = "Tokenize"
    add(R, "prompt missing", tok, IA, "prompt")
    add(R, "prompt set, neither text nor chat", lambda: tok(pb.Prompt()), IA, "prompt")
    add(R, "empty text", lambda: tok(text("")), IA, "prompt")
    add(R, "text one token over the limit", lambda: tok(text(over)), OOR, "prompt")
    add(
        R,
        "text of 3 MiB (over the character bound)",
        lambda: tok(text("a" * BIG_TEXT_CHARS)),
        OOR,
        "prompt.text",
    )
    add(
        R,
        "chat with no messages",
        lambda: tok(pb.Prompt(chat=pb.Chat())),
        IA,
        "prompt.chat.messages",
    )
    add(R, "chat role empty", lambda: tok(chat(("", "hi"))), IA, "prompt.chat.messages[0].role")
    add(
        R,
        "chat role whitespace",
        lambda: tok(chat(("user", "hi"), ("  ", "x"))),
        IA,
        "prompt.chat.messages[1].role",
    )
    n_msgs = L.max_tokens_per_prompt + 1
    add(
        R,
        "chat with more messages than tokens allowed",
        lambda: tok(chat(*[("user", "hi")] * n_msgs)),
        OOR,
        "prompt.chat.messages",
    )
    add(
        R,
        "chat content of 100,000 characters",
        lambda: tok(chat(("user", "a" * 100_000))),
        OOR,
        "prompt.chat",
    )
    add(
        R,
        "chat rendering over the token limit",
        lambda: tok(chat(("user", two_thirds), ("assistant", two_thirds))),
        OOR,
        "prompt: ",  # the rendered prompt's tokens, not a field of it
    )
    add(R, "text not UTF-8 (raw)", lambda: bad_utf8_text(1), IA, "request")
    add(R, "wrong wire type for prompt (raw varint)", lambda: b"\x08\x05", IA, "prompt")
    add(
        R,
        "message over 4 MiB",
        lambda: oversized(tok(text("hi"))),
        Code.RESOURCE_EXHAUSTED,
        "larger than max",
    )
    add(
        R,
        "edge: chat role the template renders ('wizard')",
        lambda: tok(chat(("wizard", "hi"))),
        Code.OK,
        None,
    )
    add(
        R,
        "edge: NUL and control characters",
        lambda: tok(text("a\x00b\x01\x7f\u202e")),
        Code.OK,
        None,
    )

    # ---- GetFeatureActivations ----
    R = "GetFeatureActivations"
    add(R, "no prompts", pb.GetFeatureActivationsRequest, IA, "prompts")
    add(R, "prompt 1 empty", lambda: acts(prompts=[text("a"), pb.Prompt()]), IA, "prompts[1]")
    add(
        R,
        "one prompt over max_prompts",
        lambda: acts(prompts=[text("x")] * (L.max_prompts + 1)),
        OOR,
        "prompts",
    )
    add(R, "10,000 prompts", lambda: acts(prompts=[text("x")] * 10_000), OOR, "prompts")
    add(R, "top_k_per_token -1", lambda: acts(top_k_per_token=-1), IA, "top_k_per_token")
    add(
        R,
        "top_k_per_token over max_top_k",
        lambda: acts(top_k_per_token=L.max_top_k + 1),
        OOR,
        "top_k_per_token",
    )
    add(
        R, "top_k_per_token 2^31-1", lambda: acts(top_k_per_token=2**31 - 1), OOR, "top_k_per_token"
    )
    add(R, "top_k_aggregated -5", lambda: acts(top_k_aggregated=-5), IA, "top_k_aggregated")
    add(
        R,
        "top_k_aggregated over max_top_k",
        lambda: acts(top_k_aggregated=L.max_top_k + 1),
        OOR,
        "top_k_aggregated",
    )
    add(
        R,
        "feature_ids over max_features",
        lambda: acts(feature_ids=list(range(L.max_features + 1))),
        OOR,
        "feature_ids",
    )
    add(R, "feature_ids[0] -1", lambda: acts(feature_ids=[-1]), IA, "feature_ids[0]")
    add(R, "feature_ids[0] -2^31", lambda: acts(feature_ids=[-(2**31)]), IA, "feature_ids[0]")
    add(R, "feature_ids[1] = d_sae", lambda: acts(feature_ids=[0, d_sae]), NF, "feature_ids[1]")
    add(R, "aggregation 7 (unknown enum)", lambda: acts(aggregation=7), IA, "aggregation")
    add(R, "aggregation -1 (unknown enum)", lambda: acts(aggregation=-1), IA, "aggregation")
    add(R, "unknown sae_id", lambda: acts(sae_id="no-such-sae"), NF, "sae_id")
    add(R, "sae_id of 100,000 characters", lambda: acts(sae_id="s" * HUGE_ID_CHARS), NF, "sae_id")
    add(R, "sae_id of 5,000 emoji", lambda: acts(sae_id="🐱" * 5000), NF, "sae_id")
    add(
        R,
        "prompt 3 one token over the limit",
        lambda: acts(prompts=[text("a"), text("b"), text("c"), text(over)]),
        OOR,
        "prompts[3]",
    )
    add(
        R,
        "text of 3 MiB",
        lambda: acts(prompts=[text("a" * BIG_TEXT_CHARS)]),
        OOR,
        "prompts[0].text",
    )
    add(
        R,
        "chat role empty",
        lambda: acts(prompts=[chat(("", "hi"))]),
        IA,
        "prompts[0].chat.messages[0].role",
    )
    add(R, "prompt text not UTF-8 (raw)", lambda: bad_utf8_text(2), IA, "request")
    add(
        R,
        "message over 4 MiB (2,000 prompts of 2.1 kB)",
        lambda: acts(prompts=[text("a" * 2100)] * 2000),
        Code.RESOURCE_EXHAUSTED,
        "larger than max",
    )
    add(
        R,
        "per-call token budget (strict app)",
        lambda: acts(prompts=[text(near)] * 5),
        OOR,
        "prompts",
        metadata=strict,
    )
    add(
        R,
        "response size budget (strict app)",
        lambda: acts(
            prompts=[text(near)] * 3,
            top_k_per_token=L.max_top_k,
            feature_ids=list(range(L.max_features)),
            top_k_aggregated=L.max_top_k,
        ),
        OOR,
        "prompts",
        metadata=strict,
    )

    # ---- GenerateSteered and StreamGenerateSteered: the same validation, both RPCs ----
    for R in ("GenerateSteered", "StreamGenerateSteered"):
        add(R, "prompt missing", lambda: gen(prompt=None), IA, "prompt")
        add(
            R,
            "max_new_tokens over the limit",
            lambda: gen(sampling=samp(max_new_tokens=L.max_new_tokens + 1)),
            OOR,
            "sampling.max_new_tokens",
        )
        add(
            R,
            "one stop string over the limit",
            lambda: gen(sampling=samp(stop=[f"s{i}" for i in range(L.max_stop_strings + 1)])),
            OOR,
            "sampling.stop",
        )
        add(
            R,
            "intervention mode unspecified",
            lambda: gen(interventions=[iv(mode=0)]),
            IA,
            "interventions[0].mode",
        )
        add(
            R,
            "intervention feature = d_sae",
            lambda: gen(interventions=[iv(feature=d_sae)]),
            NF,
            "interventions[0].feature",
        )
        add(R, "unknown sae_id", lambda: gen(sae_id="no-such-sae"), NF, "sae_id")
        add(R, "text of 3 MiB", lambda: gen(prompt=text("a" * BIG_TEXT_CHARS)), OOR, "prompt.text")
        add(
            R,
            "deadline of 0.3 s on a long generation",
            lambda: gen(sampling=samp(max_new_tokens=L.max_new_tokens)),
            Code.DEADLINE_EXCEEDED,
            None,
            timeout=0.3,
        )

    # ---- GenerateSteered ----
    R = "GenerateSteered"
    add(R, "empty text", lambda: gen(prompt=text("")), IA, "prompt")
    for name, t in [("1e-38", 1e-38), ("-1", -1.0), ("NaN", NAN), ("+inf", INF), ("11", 11.0)]:
        add(
            R,
            f"temperature {name}",
            partial(gen_sampling, temperature=t),
            IA,
            "sampling.temperature",
        )
    for name, p in [("1.5", 1.5), ("-0.5", -0.5), ("NaN", NAN)]:
        add(R, f"top_p {name}", partial(gen_sampling, top_p=p), IA, "sampling.top_p")
    add(
        R,
        "edge: top_p 0 (means 1)",
        lambda: gen(sampling=samp(top_p=0.0, temperature=1.0)),
        Code.OK,
        None,
    )
    # The .proto's documented range of temperature is [0.01, 10]: both ends must be accepted
    # (a float field: 0.01 arrives as float32, 0.0099999998).
    add(
        R,
        "edge: temperature 0.01 (documented minimum)",
        partial(gen_sampling, temperature=0.01),
        Code.OK,
        None,
    )
    add(
        R,
        "edge: temperature 10 (documented maximum)",
        partial(gen_sampling, temperature=10.0),
        Code.OK,
        None,
    )
    add(R, "top_k -1", lambda: gen(sampling=samp(top_k=-1)), IA, "sampling.top_k")
    add(
        R,
        "max_new_tokens -1",
        lambda: gen(sampling=samp(max_new_tokens=-1)),
        IA,
        "sampling.max_new_tokens",
    )
    add(
        R,
        "max_new_tokens 2^31-1",
        lambda: gen(sampling=samp(max_new_tokens=2**31 - 1)),
        OOR,
        "sampling.max_new_tokens",
    )
    add(
        R,
        "100,000 stop strings",
        lambda: gen(sampling=samp(stop=[str(i) for i in range(100_000)])),
        OOR,
        "sampling.stop",
    )
    add(R, "empty stop string", lambda: gen(sampling=samp(stop=[""])), IA, "sampling.stop[0]")
    add(
        R,
        "stop string one character over the limit",
        lambda: gen(sampling=samp(stop=["ok", "x" * (L.max_stop_string_chars + 1)])),
        OOR,
        "sampling.stop[1]",
    )
    add(
        R,
        "intervention mode 99 (unknown enum)",
        lambda: gen(interventions=[iv(mode=99)]),
        IA,
        "interventions[0].mode",
    )
    add(
        R,
        "intervention scope 99 (unknown enum)",
        lambda: gen(interventions=[iv(scope=99)]),
        IA,
        "interventions[0].scope",
    )
    add(
        R,
        "intervention feature -1",
        lambda: gen(interventions=[iv(feature=-1)]),
        IA,
        "interventions[0].feature",
    )
    for name, v in [("NaN", NAN), ("-inf", -INF), ("1e38", 1e38)]:
        add(
            R,
            f"intervention value {name}",
            partial(gen_edit, mode=Iv.MODE_ADD, value=v),
            IA,
            "interventions[0].value",
        )
    add(
        R,
        "ablate with value NaN (documented finite)",
        lambda: gen(interventions=[iv(mode=Iv.MODE_ABLATE, value=NAN)]),
        IA,
        "interventions[0].value",
    )
    add(
        R,
        "interventions over max_features",
        lambda: gen(interventions=[iv(feature=i) for i in range(L.max_features + 1)]),
        OOR,
        "interventions",
    )
    add(
        R,
        "same feature twice, overlapping scopes",
        lambda: gen(interventions=[iv(feature=3), iv(feature=3, scope=Iv.SCOPE_PROMPT)]),
        IA,
        "interventions[1]",
    )
    d_other = ctx.d_sae[other]
    add(
        R,
        f"feature = d_sae of {other}",
        lambda: gen(sae_id=other, interventions=[iv(feature=d_other)]),
        NF,
        "interventions[0].feature",
    )
    cond = "interventions[0].condition"
    add(
        R,
        "condition with neither feature nor direction",
        lambda: gen(interventions=[_cond(pb.Condition(threshold=1.0))]),
        IA,
        cond,
    )
    add(
        R,
        "condition feature = d_sae",
        lambda: gen(interventions=[_cond(pb.Condition(feature=d_sae))]),
        NF,
        f"{cond}.feature",
    )
    add(
        R,
        "condition direction of 2 floats",
        lambda: gen(interventions=[_cond(pb.Condition(direction=_dense([1.0, 2.0])))]),
        IA,
        f"{cond}.direction",
    )
    add(
        R,
        "condition threshold NaN",
        lambda: gen(interventions=[_cond(pb.Condition(feature=1, threshold=float("nan")))]),
        IA,
        f"{cond}.threshold",
    )
    add(
        R,
        "chat with no messages",
        lambda: gen(prompt=pb.Prompt(chat=pb.Chat())),
        IA,
        "prompt.chat.messages",
    )
    add(
        R,
        "stop string not UTF-8 (raw)",
        lambda: gen().SerializeToString() + field_bytes(4, field_bytes(6, b"\xc3\x28")),
        IA,
        "request",
    )
    add(
        R,
        "edge: seed 2^64-1, temperature 10, top_k 1",
        lambda: gen(sampling=samp(seed=2**64 - 1, temperature=10.0, top_k=1)),
        Code.OK,
        None,
    )

    # ---- StreamGenerateSteered ----
    R = "StreamGenerateSteered"
    add(
        R,
        "temperature 1e-38",
        lambda: gen(sampling=samp(temperature=1e-38)),
        IA,
        "sampling.temperature",
    )
    add(R, "top_p 1.5", lambda: gen(sampling=samp(top_p=1.5)), IA, "sampling.top_p")
    add(
        R,
        "chat role empty",
        lambda: gen(prompt=chat(("", "hi"))),
        IA,
        "prompt.chat.messages[0].role",
    )
    add(R, "malformed protobuf: corrupt", lambda: CORRUPT, IA, "request")
    add(
        R,
        "message over 4 MiB",
        lambda: oversized(gen()),
        Code.RESOURCE_EXHAUSTED,
        "larger than max",
    )
    add(
        R,
        "metadata: API key missing (strict app)",
        gen,
        Code.UNAUTHENTICATED,
        "API key",
        metadata=strict_nokey,
    )

    # ---- SearchFeaturesByContrast ----
    R = "SearchFeaturesByContrast"
    add(R, "both sides empty", pb.SearchFeaturesByContrastRequest, IA, "positive")
    add(R, "one positive prompt", lambda: contrast(pos=1), IA, "positive")
    add(R, "one negative prompt", lambda: contrast(neg=1), IA, "negative")
    cap = L.max_contrast_prompts + 1
    add(R, "positive over max_contrast_prompts", lambda: contrast(pos=cap), OOR, "positive")
    add(R, "negative over max_contrast_prompts", lambda: contrast(neg=cap), OOR, "negative")
    add(
        R,
        "aggregation SUM (not allowed)",
        lambda: contrast(aggregation=pb.AGGREGATION_SUM),
        IA,
        "aggregation",
    )
    add(R, "aggregation 42 (unknown enum)", lambda: contrast(aggregation=42), IA, "aggregation")
    add(R, "top_n -1", lambda: contrast(top_n=-1), IA, "top_n")
    add(R, "top_n over max_top_k", lambda: contrast(top_n=L.max_top_k + 1), OOR, "top_n")
    add(R, "locations_per_hit -1", lambda: contrast(locations_per_hit=-1), IA, "locations_per_hit")
    add(
        R,
        "locations_per_hit over max_top_k",
        lambda: contrast(locations_per_hit=L.max_top_k + 1),
        OOR,
        "locations_per_hit",
    )
    add(R, "unknown sae_id", lambda: contrast(sae_id="no-such-sae"), NF, "sae_id")
    add(
        R,
        "negative[1] empty",
        lambda: contrast(negative=[text("a"), pb.Prompt()]),
        IA,
        "negative[1]",
    )
    add(
        R,
        "positive[0] one token over the limit",
        lambda: contrast(positive=[text(over), text("b")]),
        OOR,
        "positive[0]",
    )
    add(
        R,
        "per-call token budget over both sides (strict app)",
        lambda: contrast(positive=[text(near)] * 3, negative=[text(near)] * 2),
        OOR,
        "negative",
        metadata=strict,
    )
    add(R, "malformed protobuf: truncated length", lambda: TRUNCATED, IA, "request")
    add(R, "order_by 9 (unknown enum)", lambda: contrast(order_by=9), IA, "order_by")

    # ---- GetFeature ----
    R = "GetFeature"
    add(R, "feature -1", lambda: pb.GetFeatureRequest(feature=-1), IA, "feature")
    add(R, "feature = d_sae", lambda: pb.GetFeatureRequest(feature=d_sae), NF, "feature")
    add(R, "feature 2^31-1", lambda: pb.GetFeatureRequest(feature=2**31 - 1), NF, "feature")
    add(
        R,
        f"feature = d_sae of {other}",
        lambda: pb.GetFeatureRequest(sae_id=other, feature=d_other),
        NF,
        "feature",
    )
    add(
        R, "top_logits -1", lambda: pb.GetFeatureRequest(feature=1, top_logits=-1), IA, "top_logits"
    )
    add(
        R,
        "top_logits over max_top_k",
        lambda: pb.GetFeatureRequest(feature=1, top_logits=L.max_top_k + 1),
        OOR,
        "top_logits",
    )
    add(
        R, "neighbours -3", lambda: pb.GetFeatureRequest(feature=1, neighbours=-3), IA, "neighbours"
    )
    add(
        R,
        "neighbours over max_top_k",
        lambda: pb.GetFeatureRequest(feature=1, neighbours=L.max_top_k + 1),
        OOR,
        "neighbours",
    )
    add(R, "unknown sae_id", lambda: pb.GetFeatureRequest(sae_id="no-such-sae"), NF, "sae_id")
    add(
        R,
        "sae_id of 100,000 characters",
        lambda: pb.GetFeatureRequest(sae_id="s" * HUGE_ID_CHARS),
        NF,
        "sae_id",
    )
    add(
        R,
        "sae_id of 2,000 CJK characters",
        lambda: pb.GetFeatureRequest(sae_id="日" * 2000),
        NF,
        "sae_id",
    )
    add(R, "malformed protobuf: corrupt", lambda: CORRUPT, IA, "request")
    add(R, "sae_id not UTF-8 (raw)", lambda: field_bytes(1, b"\xed\xa0\x80"), IA, "request")

    # ---- AttributeFeatures ----
    R = "AttributeFeatures"
    add(R, "no prompt", pb.AttributeFeaturesRequest, IA, "prompt")
    add(R, "target_token -1", lambda: attr(target_token=-1), IA, "target_token")
    add(R, "target_token 2^31-1", lambda: attr(target_token=2**31 - 1), IA, "target_token")
    add(R, "target_text of two tokens", lambda: attr(target_text="Hello world"), IA, "target_text")
    add(
        R,
        "target_text of 10,000 characters",
        lambda: attr(target_text="x" * 10_000),
        IA,
        "target_text",
    )
    add(
        R,
        "target_token and target_text",
        lambda: attr(target_token=1, target_text="a"),
        IA,
        "target_token",
    )
    add(R, "top_n -1", lambda: attr(top_n=-1), IA, "top_n")
    add(R, "top_n over max_top_k", lambda: attr(top_n=L.max_top_k + 1), OOR, "top_n")
    add(R, "unknown sae_id", lambda: attr(sae_id="no-such-sae"), NF, "sae_id")
    add(R, "prompt one token over the limit", lambda: attr(prompt=text(over)), OOR, "prompt")
    add(R, "malformed protobuf: corrupt", lambda: CORRUPT, IA, "request")
    return out


def attr(**kw: Any) -> pb.AttributeFeaturesRequest:
    return pb.AttributeFeaturesRequest(**{"prompt": text("Hello world"), **kw})


def _cond(condition: pb.Condition) -> pb.Intervention:
    """An add edit of feature 1 under ``condition``."""
    return pb.Intervention(feature=1, mode=Iv.MODE_ADD, value=1.0, condition=condition)


def _dense(values: list[float]) -> pb.DenseTensor:
    return pb.DenseTensor(shape=[len(values)], data=struct.pack(f"<{len(values)}f", *values))
