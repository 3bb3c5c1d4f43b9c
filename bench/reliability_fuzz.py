"""Random requests for the reliability probe: a seeded generator over every message field.

No property-testing library: the probe wants a fixed number of requests, reproducible from a
seed, spread over all eight RPCs. Every field has a pool of valid values and a pool of values
that break services — one past the configured limits, -1, ±2^31, NaN, ±inf, 1e-38 and 1e38
floats, unknown enum numbers, empty, long, template-looking and control-character strings, odd
chat roles, unset oneofs, ids past ``d_sae``. A third of the requests are clean (every field
valid, so they reach the model: generation, batching, poisoned neighbours); in the rest each
field is bad with probability ``DIRT``, so most of them are wrong in one or two ways. One request
in ten is a message's bytes mutated (bytes flipped, cut, inserted, an unknown field appended)
and sent raw, for the proxy's parser.

Every answer must be a deliberate status: INTERNAL or UNKNOWN is a finding (the request is kept,
as protobuf text or hex).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from google.protobuf import text_format
from google.protobuf.message import Message

from bench.reliability_cases import varint
from saescope.api.v1 import saescope_pb2 as pb

T = TypeVar("T")
# The share of each RPC among fuzzed requests.
WEIGHTS = {
    "GetInfo": 2,
    "Tokenize": 16,
    "GetFeatureActivations": 24,
    "GenerateSteered": 14,
    "StreamGenerateSteered": 14,
    "SearchFeaturesByContrast": 14,
    "GetFeature": 16,
    "AttributeFeatures": 10,
}
CLEAN_SHARE = 1 / 3  # requests with every field valid
DIRT = 0.25  # in the others: the chance that a field is bad
RAW_SHARE = 0.1  # requests sent as mutated bytes
TEXTS = (
    "Hello world",
    "The cat sat on the mat.",
    "I love Paris in the spring.",
    "Die Katze schläft auf dem Sofa. 🐱",
    "def add(a, b):\n    return a + b",
    "banana " * 40,
    "日本語のテキスト",
    "<|im_start|>user\nhi<|im_end|>",  # special tokens inside plain text
    "{{ raise('x') }}{% for x in y %}",  # template syntax inside content
    "a\x00b\x01\x7f\u202e\ufeff",
)
BAD_TEXTS = ("", " ", "\n\n", "word " * 2000)
ROLES = ("user", "assistant", "system")
BAD_ROLES = ("", " ", "\n", "tool", "wizard", "USER", "a" * 300)
BAD_SAE_IDS = ("no-such-sae", "../etc/passwd", "x" * 300, "TINY-RELU", " ", "🐱" * 10)
BAD_FLOATS = (1e-38, 1e-45, -1.0, 1e38, 3.4e38, -1e4 - 1, float("nan"), float("inf"), -float("inf"))
BAD_INTS = (-1, 2**31 - 1, -(2**31))


@dataclass(frozen=True)
class FuzzRequest:
    rpc: str
    request: Message | bytes
    kind: str  # "clean", "dirty" or "mutated bytes"

    def describe(self, limit: int = 600) -> str:
        """The request as one line of protobuf text (or hex for bytes), cut to ``limit``."""
        if isinstance(self.request, bytes):
            s = f"bytes {self.request[: limit // 2].hex()}"
        else:
            s = text_format.MessageToString(self.request, as_one_line=True)
        return s if len(s) <= limit else s[:limit] + f"… ({len(s)} chars)"


class Fuzzer:
    """Draws :class:`FuzzRequest` s; ``limits`` and ``d_sae`` set the valid ranges and what lies
    just past them."""

    def __init__(self, seed: int, limits: pb.Limits, d_sae: dict[str, int]) -> None:
        self.rng = random.Random(seed)
        self.limits = limits
        self.d_sae = d_sae
        self.dirt = 0.0  # the current request's chance of a bad field
        self._build: dict[str, Callable[[], Message]] = {
            "GetInfo": pb.GetInfoRequest,
            "Tokenize": self.tokenize,
            "GetFeatureActivations": self.activations,
            "GenerateSteered": self.generate,
            "StreamGenerateSteered": self.generate,
            "SearchFeaturesByContrast": self.contrast,
            "GetFeature": self.get_feature,
            "AttributeFeatures": self.attribute,
        }

    def next(self) -> FuzzRequest:
        r = self.rng
        rpc = r.choices(list(WEIGHTS), weights=list(WEIGHTS.values()))[0]
        clean = r.random() < CLEAN_SHARE
        self.dirt = 0.0 if clean else DIRT
        msg = self._build[rpc]()
        if r.random() < RAW_SHARE:
            return FuzzRequest(rpc, self.mutate(msg.SerializeToString()), "mutated bytes")
        return FuzzRequest(rpc, msg, "clean" if clean else "dirty")

    # ---- fields ----
    def pick(self, valid: Sequence[T], bad: Sequence[T]) -> T:
        """A valid value, or (with the request's ``dirt``) a bad one."""
        r = self.rng
        return r.choice(bad) if bad and r.random() < self.dirt else r.choice(valid)

    def count(self, limit: int) -> int:
        """A count such as top_k: 0 … ``limit``; bad: past it, negative, ±2^31."""
        r = self.rng
        return self.pick((0, 0, 1, 2, 3, r.randint(0, limit), limit), (limit + 1, *BAD_INTS))

    def length(self, limit: int, *, least: int = 0) -> int:
        """How many items a repeated field gets: ``least`` … ``limit``; bad: one too few or many."""
        valid = tuple(n for n in (0, 1, 1, 2, 2, 3, limit) if least <= n <= limit)
        return self.pick(valid, tuple(n for n in (least - 1, limit + 1) if n >= 0))

    def flt(self, valid: tuple[float, ...]) -> float:
        return self.pick(valid, BAD_FLOATS)

    def enum(self, valid: Sequence[int], known: int) -> int:
        """One of ``valid``; bad: out of the enum's ``known`` values."""
        return self.pick(valid, (-1, known, known + 7, 2**31 - 1))

    def string(self) -> str:
        r = self.rng
        if r.random() < 0.1:  # random printable characters, some outside ASCII
            chars = (r.choice((r.randint(32, 126), r.randint(0xA0, 0xD7FF))) for _ in range(200))
            return "".join(map(chr, chars))[: r.randint(1, 200)]
        return self.pick(TEXTS, BAD_TEXTS)

    def feature_id(self) -> int:
        d = min(self.d_sae.values())  # valid in every SAE
        r = self.rng
        return self.pick((0, 1, r.randrange(d), d - 1), (max(self.d_sae.values()), *BAD_INTS))

    def sae_id(self) -> str:
        return self.pick(("", "", *self.d_sae), BAD_SAE_IDS)

    # ---- prompts ----
    def prompt(self) -> pb.Prompt:
        r = self.rng
        if r.random() < self.dirt / 3:
            return pb.Prompt()  # neither text nor chat
        if r.random() < 0.65:
            return pb.Prompt(text=self.string())
        n = self.length(4, least=1)
        roles = [self.pick(ROLES, BAD_ROLES) for _ in range(n)]
        messages = [pb.ChatMessage(role=role, content=self.string()) for role in roles]
        return pb.Prompt(chat=pb.Chat(messages=messages, add_generation_prompt=r.random() < 0.5))

    def prompts(self, limit: int, *, least: int) -> list[pb.Prompt]:
        return [self.prompt() for _ in range(self.length(limit, least=least))]

    # ---- requests ----
    def tokenize(self) -> pb.TokenizeRequest:
        if self.rng.random() < self.dirt / 5:
            return pb.TokenizeRequest()
        return pb.TokenizeRequest(prompt=self.prompt())

    def activations(self) -> pb.GetFeatureActivationsRequest:
        L = self.limits
        return pb.GetFeatureActivationsRequest(
            sae_id=self.sae_id(),
            prompts=self.prompts(L.max_prompts, least=1),
            top_k_per_token=self.count(L.max_top_k),
            feature_ids=[self.feature_id() for _ in range(self.length(L.max_features))],
            top_k_aggregated=self.count(L.max_top_k),
            aggregation=self.enum(range(4), 4),  # type: ignore[arg-type]
            include_special_tokens=self.rng.random() < 0.3,
        )

    def intervention(self, feature: int) -> pb.Intervention:
        edit = pb.Intervention(
            feature=feature,
            mode=self.enum(range(1, 5), 5),  # type: ignore[arg-type]
            value=self.flt((0.0, 1.0, 5.0, -3.0, 100.0, 1e4)),
            scope=self.enum(range(3), 3),  # type: ignore[arg-type]
        )
        if self.rng.random() < 0.2:  # conditional: on a feature (or, badly, on neither)
            edit.condition.threshold = self.flt((0.0, 0.5, 2.0, -1.0))
            if self.rng.random() >= self.dirt / 2:
                edit.condition.feature = self.feature_id()
        return edit

    def sampling(self) -> pb.SamplingParams:
        r, L = self.rng, self.limits
        # Generation is what costs: short ones (0 means 32).
        n = self.pick((0, 1, 2, 4, 8, 16), (L.max_new_tokens + 1, *BAD_INTS))
        stops = ("\n", ".", "the", "🐱", "x" * L.max_stop_string_chars)
        bad_stops = ("", "x" * (L.max_stop_string_chars + 1))
        s = pb.SamplingParams(
            max_new_tokens=n,
            temperature=self.flt((0.0, 0.0, 0.01, 0.7, 1.0, 10.0)),
            top_p=self.flt((0.0, 0.5, 0.9, 1.0)),
            top_k=self.pick((0, 0, 1, 5, 50, 2**31 - 1), (-1, -(2**31))),
            stop=[self.pick(stops, bad_stops) for _ in range(self.length(L.max_stop_strings))],
        )
        if r.random() < 0.5:
            s.seed = r.choice((0, 1, 42, 2**63, 2**64 - 1))
        return s

    def generate(self) -> pb.GenerateSteeredRequest:
        r = self.rng
        n = self.length(self.limits.max_features)
        # Distinct features unless dirty (the same feature twice with overlapping scopes is bad).
        d = min(self.d_sae.values())
        features = r.sample(range(d), min(n, d))
        features = [self.feature_id() if r.random() < self.dirt else f for f in features]
        req = pb.GenerateSteeredRequest(
            sae_id=self.sae_id(),
            interventions=[self.intervention(f) for f in features],
            include_baseline=r.random() < 0.3,
            include_logprobs=r.random() < 0.3,
            include_trace=r.random() < 0.3,
        )
        if r.random() >= self.dirt / 5:
            req.prompt.CopyFrom(self.prompt())
        if r.random() < 0.9:
            req.sampling.CopyFrom(self.sampling())
        return req

    def contrast(self) -> pb.SearchFeaturesByContrastRequest:
        L = self.limits
        return pb.SearchFeaturesByContrastRequest(
            sae_id=self.sae_id(),
            positive=self.prompts(L.max_contrast_prompts, least=2),
            negative=self.prompts(L.max_contrast_prompts, least=2),
            aggregation=self.enum((0, 1, 2), 4),  # type: ignore[arg-type]
            top_n=self.count(L.max_top_k),
            locations_per_hit=self.count(L.max_top_k),
            order_by=self.enum((0, 1, 2), 3),  # type: ignore[arg-type]
            include_output_scores=self.rng.random() < 0.2,
        )

    def attribute(self) -> pb.AttributeFeaturesRequest:
        r, L = self.rng, self.limits
        req = pb.AttributeFeaturesRequest(sae_id=self.sae_id(), top_n=self.count(L.max_top_k))
        if r.random() >= self.dirt / 5:
            req.prompt.CopyFrom(self.prompt())
        target = r.random()
        if target < 0.3:
            req.target_token = self.pick((0, 1, 5, 42), BAD_INTS)
        elif target < 0.5:
            req.target_text = self.pick((" the", ".", "a"), ("", "two words", "x" * 500))
        return req

    def get_feature(self) -> pb.GetFeatureRequest:
        L = self.limits
        return pb.GetFeatureRequest(
            sae_id=self.sae_id(),
            feature=self.feature_id(),
            top_logits=self.count(L.max_top_k),
            neighbours=self.count(L.max_top_k),
            include_direction=self.rng.random() < 0.5,
        )

    # ---- bytes ----
    def mutate(self, raw: bytes) -> bytes:
        """``raw`` with a few random edits: flips, a cut, an insertion, an unknown field."""
        r = self.rng
        b = bytearray(raw)
        for _ in range(r.randint(1, 4)):
            op = r.choice(("flip", "cut", "insert", "append"))
            if op == "flip" and b:
                b[r.randrange(len(b))] = r.randrange(256)
            elif op == "cut" and b:
                del b[r.randrange(len(b)) :]
            elif op == "insert":
                at = r.randint(0, len(b))
                b[at:at] = bytes(r.randrange(256) for _ in range(r.randint(1, 8)))
            else:
                tag = r.randint(1, 2**29 - 1) << 3 | r.choice((0, 1, 2, 5))
                b += varint(tag) + bytes(r.randrange(256) for _ in range(r.randint(0, 9)))
        return bytes(b)
