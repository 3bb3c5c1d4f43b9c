"""Cheap requests that would buy a lot of work are refused before the work, naming the field.

Prompt text beyond what ``max_tokens_per_prompt`` tokens can hold is refused without
tokenising it; a call's prompts share a token budget and encoding stops at the prompt over it;
an activation response is bounded before any forward (the bound is checked against the real
serialized size); the message-size bound reaches Ray Serve's gRPC proxy (``wire_limits``).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from saescope.api.v1 import saescope_pb2 as pb
from saescope.service import activations, convert, prompts, wire_limits
from saescope.service import types as t
from saescope.service.activations import ActivationsPlan
from saescope.service.engine import Engine
from saescope.service.errors import OutOfRange
from tests.service.engine_fixtures import tiny_engine

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def engine() -> Engine:
    return tiny_engine()


def limited(engine: Engine, **changes: int) -> Engine:
    """A view of ``engine`` with other limits (the same model, tokenizer and SAEs)."""
    other = object.__new__(Engine)
    other.__dict__.update(engine.__dict__)
    other.limits = dataclasses.replace(engine.limits, **changes)
    other.prompt_limits = engine.prompt_limits._replace(
        max_call_tokens=other.limits.max_tokens_per_call
    )
    return other


@contextmanager
def counting_tokenizer(engine: Engine) -> Iterator[list[int]]:
    """Counts the characters the tokenizer is asked to tokenise, call by call."""
    tok = engine.rt.tokenizer
    cls = type(tok)
    real = cls.__call__
    calls: list[int] = []

    def counted(self: Any, text: Any, *args: Any, **kwargs: Any) -> Any:
        if self is tok:
            calls.append(len(text))
        return real(self, text, *args, **kwargs)

    cls.__call__ = counted  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        cls.__call__ = real  # type: ignore[method-assign]


def text(s: str) -> t.Prompt:
    return t.Prompt(text=s)


# ---- prompt size before tokenising ---------------------------------------------------------------
def test_the_character_bound_is_sound(engine: Engine) -> None:
    """No text has more characters than ``token_chars`` × its tokens: the bound refuses only
    prompts that are over the token limit anyway."""
    tok = engine.rt.tokenizer
    chars = prompts.token_chars(tok)
    longest = max(range(len(tok)), key=lambda i: len(tok.decode([i])))
    samples = [
        "The Eiffel Tower is in Paris. " * 20,
        "日本語のテキスト and ünïcödé " * 10,
        tok.decode([longest]) * 50,  # the longest token, over and over
        " " * 5000,
        "def f(x):\n    return x\n" * 30,
    ]
    for s in samples:
        assert len(s) <= chars * len(tok(s, add_special_tokens=False)["input_ids"]), s[:30]
    assert engine.prompt_limits.max_chars == engine.limits.max_tokens_per_prompt * chars


@pytest.mark.parametrize("rpc", ["tokenize", "activations", "generate"])
def test_a_huge_prompt_is_refused_without_tokenising(engine: Engine, rpc: str) -> None:
    huge = "a" * (8 * 2**20)  # 8 MiB: ~10 s of tokenising before this check existed
    calls = {
        "tokenize": lambda: engine.tokenize(t.TokenizeRequest(text(huge))),
        "activations": lambda: engine.activations(t.ActivationsRequest(prompts=[text(huge)])),
        "generate": lambda: engine.validate_generate(t.GenerateRequest(text(huge))),
    }
    with counting_tokenizer(engine) as tokenised, pytest.raises(OutOfRange) as e:
        calls[rpc]()
    assert tokenised == []
    field = "prompts[0].text" if rpc == "activations" else "prompt.text"
    assert e.value.field == field and e.value.limit == engine.prompt_limits.max_chars
    assert f"{8 * 2**20} characters exceeds the limit of {e.value.limit}" in e.value.message


def test_a_prompt_at_the_character_bound_is_tokenised(engine: Engine) -> None:
    """Below the bound the token count decides (an ordinary OUT_OF_RANGE on tokens)."""
    near = "The cat sat. " * (engine.prompt_limits.max_chars // 13)
    assert len(near) <= engine.prompt_limits.max_chars
    with counting_tokenizer(engine) as tokenised, pytest.raises(OutOfRange, match="tokens"):
        engine.tokenize(t.TokenizeRequest(text(near)))
    assert tokenised == [len(near)]


def test_a_huge_chat_is_refused_before_the_template(engine: Engine) -> None:
    big = engine.prompt_limits.max_chars + 1
    cases = [
        ((t.ChatMessage("user", "x" * big),), "prompt.chat", "characters of content"),
        (
            tuple(
                t.ChatMessage("user", "") for _ in range(engine.limits.max_tokens_per_prompt + 1)
            ),
            "prompt.chat.messages",
            "messages",
        ),
    ]
    for chat, field, what in cases:
        with counting_tokenizer(engine) as tokenised, pytest.raises(OutOfRange) as e:
            engine.tokenize(t.TokenizeRequest(t.Prompt(chat=chat)))
        assert tokenised == [] and e.value.field == field and what in e.value.message


# ---- a call's token budget -----------------------------------------------------------------------
def test_activation_calls_have_a_token_budget(engine: Engine) -> None:
    small = limited(engine, max_tokens_per_call=40)
    each = "The quick brown fox jumps over the lazy dog"  # 9 tokens
    n = len(engine.tokenize(t.TokenizeRequest(text(each))).tokens)
    req = t.ActivationsRequest(prompts=[text(each)] * 8)
    with counting_tokenizer(engine) as tokenised, pytest.raises(OutOfRange) as e:
        small.activations(req)
    over = 40 // n + 1  # the first prompt that goes over the budget
    assert len(tokenised) == over  # encoding stopped there: the rest were never tokenised
    assert e.value.field == "prompts" and e.value.limit == 40
    assert f"tokens in the call up to prompts[{over - 1}]" in e.value.message
    ok = small.activations(t.ActivationsRequest(prompts=[text(each)] * (40 // n)))
    assert len(ok.prompts) == 40 // n


def test_contrast_sides_share_the_token_budget(engine: Engine) -> None:
    side = [text("Bananas are yellow."), text("I like bananas.")]
    per_side = sum(len(engine.tokenize(t.TokenizeRequest(p)).tokens) for p in side)
    small = limited(engine, max_tokens_per_call=per_side + 2)
    with pytest.raises(OutOfRange) as e:
        small.contrast(t.ContrastRequest(positive=side, negative=side))
    assert e.value.field == "negative" and "up to negative[0]" in e.value.message


# ---- the response's size -------------------------------------------------------------------------
REQUESTS = [
    t.ActivationsRequest(prompts=[text("The cat sat on the mat.")]),
    t.ActivationsRequest(
        prompts=[text("日本語のテキスト"), text("Dogs bark at night " * 4)],
        top_k_per_token=128,
        feature_ids=list(range(20)),
        top_k_aggregated=50,
        sae_id="topk",
    ),
    t.ActivationsRequest(
        prompts=[t.Prompt(chat=(t.ChatMessage("user", "Name a colour."),))],
        top_k_per_token=5,
        include_special_tokens=True,
    ),
]


@pytest.mark.parametrize("i", range(len(REQUESTS)))
def test_the_response_size_is_bounded_before_work(engine: Engine, i: int) -> None:
    req = REQUESTS[i]
    plan = engine.plan_activations(req)
    bound = activations.response_bytes(plan.encoded, req, plan.sae)
    response = pb.GetFeatureActivationsResponse
    actual = convert.response(engine.activations(req), response).ByteSize()
    assert actual <= bound <= 3 * actual + 2000  # an upper bound, and not a wild one
    tight = limited(engine, max_response_bytes=bound - 1)
    with pytest.raises(OutOfRange) as e:
        tight.plan_activations(req)
    assert e.value.field == "prompts" and e.value.value == bound
    assert "bytes of response" in e.value.message and "top_k_per_token" in e.value.message


def test_default_limits_keep_a_response_under_the_wire_limit() -> None:
    """The default budget with the largest top_k cannot pass ``max_response_bytes``, and that is
    under the 4 MiB gRPC bound (so the check, not the transport, refuses)."""
    lim = t.Limits()
    assert lim.max_response_bytes < wire_limits.MAX_MESSAGE_BYTES
    # A maximal request within the token budget: the check is what stops it.
    per_token = 28 + 9 + 4 * lim.max_features + 12 + 9 * lim.max_top_k
    assert lim.max_tokens_per_call * per_token > lim.max_response_bytes


# ---- cutting a call into slices ------------------------------------------------------------------
def test_parts_cover_every_prompt_once_within_the_slice(engine: Engine) -> None:
    texts = ["a b c d e f g h i j k l", "x", "The cat sat on the mat.", "Hi", "one two three four"]
    plan = engine.plan_activations(t.ActivationsRequest(prompts=[text(s) for s in texts]))
    for slice_tokens in (1, 5, 12, 30, 10**6):
        parts = plan.parts(slice_tokens)
        seen = sorted(i for p in parts for i in p.indices)
        assert seen == list(range(len(texts)))
        for p in parts:
            longest = max(len(plan.encoded[i].ids) for i in p.indices)
            assert len(p.indices) == 1 or longest * len(p.indices) <= slice_tokens
        assert (len(parts) == 1) == (slice_tokens == 10**6)
    whole = engine.activations(t.ActivationsRequest(prompts=[text(s) for s in texts]))
    parts = plan.parts(5)
    pieced = plan.result(parts, engine.run_activation_parts(parts))
    assert isinstance(plan, ActivationsPlan) and len(pieced.prompts) == len(texts)
    for a, b in zip(pieced.prompts, whole.prompts, strict=True):
        assert a.tokens == b.tokens and a.error_norms == pytest.approx(b.error_norms, abs=1e-4)


# ---- the message-size bound reaches the proxy ----------------------------------------------------
def test_controller_options_carry_the_message_limit() -> None:
    opts = wire_limits.controller_options()
    assert opts == {"runtime_env": {"env_vars": {wire_limits.ENV_VAR: str(4 * 2**20)}}}
    with pytest.raises(ValueError, match="max_bytes"):
        wire_limits.proxy_env(0)


PROXY_CHECK = """
import grpc, ray
from ray import serve
from saescope.api.v1 import saescope_pb2 as pb, saescope_pb2_grpc as pbg
from saescope.service import wire_limits
from tests.support.serve import SERVICER_FUNCTIONS, free_port

port = free_port()
ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
serve.start(
    proxy_location="HeadOnly",
    http_options={"host": "127.0.0.1", "port": free_port()},
    grpc_options={"port": port, "grpc_servicer_functions": SERVICER_FUNCTIONS},
    controller_options=wire_limits.controller_options(),
)
big = wire_limits.MAX_MESSAGE_BYTES + 1024
with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
    stub = pbg.SaeScopeStub(ch)
    for n in (1000, big):
        try:
            stub.Tokenize(pb.TokenizeRequest(prompt=pb.Prompt(text="a" * n)), timeout=60)
        except grpc.RpcError as e:
            print(n, e.code().name, e.details())
serve.shutdown()
ray.shutdown()
"""


@pytest.mark.slow
def test_the_proxy_refuses_messages_over_the_limit() -> None:
    """A fresh Ray + Serve (no app: only the proxy answers) started with
    ``controller_options=wire_limits.controller_options()``: a message over 4 MiB is refused by
    gRPC itself; a small one gets as far as routing (NOT_FOUND: no app)."""
    env = os.environ | {"PYTHONPATH": str(ROOT), "RAY_DEDUP_LOGS": "0"}
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(PROXY_CHECK)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    lines = [ln for ln in out.stdout.splitlines() if ln[:1].isdigit()]
    assert len(lines) == 2, out.stdout + out.stderr
    assert lines[0].startswith("1000 NOT_FOUND")
    big = wire_limits.MAX_MESSAGE_BYTES + 1024
    assert lines[1].startswith(f"{big} RESOURCE_EXHAUSTED")
    assert "larger than max" in lines[1] and str(wire_limits.MAX_MESSAGE_BYTES) in lines[1]
