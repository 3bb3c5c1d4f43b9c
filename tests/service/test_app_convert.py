"""Protobuf ⇄ domain conversion by shape: dense tensors, wire-only validation, optional fields,
and the domain types kept in step with the messages and vocabularies."""

from __future__ import annotations

import numpy as np
import pytest

from saescope.api.v1 import saescope_pb2 as pb
from saescope.api.v1.vocabulary import WireError
from saescope.service import convert
from saescope.service import types as t
from saescope.service.errors import InvalidArgument


def test_dense_tensors_are_little_endian_float32_row_major() -> None:
    x = np.arange(6, dtype=np.float64).reshape(2, 3) / 7
    msg = convert.dense_to_proto(x)
    assert list(msg.shape) == [2, 3] and len(msg.data) == 24
    assert msg.data[:8] == np.array([0, 1 / 7], dtype="<f4").tobytes()
    np.testing.assert_array_equal(convert.dense_from_proto(msg), x.astype(np.float32))
    with pytest.raises(WireError, match=r"^direction: 20 bytes"):
        convert.dense_from_proto(pb.DenseTensor(shape=[2, 3], data=msg.data[:20]), "direction")


def test_prompts_and_chats() -> None:
    assert convert.prompt_from_proto(pb.Prompt(text=""), "p") == t.Prompt(text="")
    chat = pb.Prompt(chat=pb.Chat(messages=[pb.ChatMessage(role="user", content="hi")]))
    assert convert.prompt_from_proto(chat, "p") == t.Prompt(chat=(t.ChatMessage("user", "hi"),))
    with pytest.raises(InvalidArgument, match=r"^prompts\[1\]: set either text or chat"):
        convert.request(
            pb.GetFeatureActivationsRequest(prompts=[pb.Prompt(text="a"), pb.Prompt()]),
            t.ActivationsRequest,
        )
    with pytest.raises(InvalidArgument, match=r"^prompt: required"):
        convert.request(pb.GenerateSteeredRequest(), t.GenerateRequest)
    with pytest.raises(InvalidArgument, match=r"^prompt: required"):
        convert.request(pb.TokenizeRequest(), t.TokenizeRequest)


def test_enums_unset_or_unknown_name_the_field() -> None:
    req = pb.GenerateSteeredRequest(prompt=pb.Prompt(text="a"))
    req.interventions.add(feature=3)
    with pytest.raises(InvalidArgument, match=r"^interventions\[0\]\.mode: required"):
        convert.request(req, t.GenerateRequest)
    req.interventions[0].mode = 99  # type: ignore[assignment]
    with pytest.raises(InvalidArgument, match=r"^interventions\[0\]\.mode: unknown value 99"):
        convert.request(req, t.GenerateRequest)
    bad = pb.GetFeatureActivationsRequest(prompts=[pb.Prompt(text="a")], aggregation=7)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match=r"^aggregation: unknown value 7"):
        convert.request(bad, t.ActivationsRequest)


def test_generate_request_fields() -> None:
    req = pb.GenerateSteeredRequest(
        sae_id="s",
        prompt=pb.Prompt(text="a"),
        interventions=[
            pb.Intervention(
                feature=2,
                mode=pb.Intervention.MODE_ADD,
                value=1.5,
                scope=pb.Intervention.SCOPE_PROMPT,
            )
        ],
        sampling=pb.SamplingParams(temperature=0.5, top_p=0.75, top_k=5, stop=["\n"]),
        include_trace=True,
    )
    out = convert.request(req, t.GenerateRequest)
    assert out.interventions == [t.Intervention(2, "add", 1.5, "prompt")]
    assert out.sampling == t.Sampling(0, 0.5, 0.75, 5, None, ("\n",))
    req.sampling.seed = 0  # an explicit 0 is a seed, not "unset"
    assert convert.request(req, t.GenerateRequest).sampling.seed == 0


def test_stream_events_and_optional_fields() -> None:
    tok = t.Token(id=5, text="a", start=0, end=1)
    event = convert.generate_event(t.TokenEvent("baseline", 3, tok, "a", None, [1.0]))
    assert event.WhichOneof("event") == "token"
    assert event.token.branch == pb.GenerateSteeredEvent.BRANCH_BASELINE
    assert (event.token.index, event.token.logprob, list(event.token.trace)) == (3, 0.0, [1.0])
    done = t.GenerationResult("s", [tok], t.Completion("a", [tok], [], "eos", []))
    msg = convert.generate_event(done)
    assert msg.WhichOneof("event") == "done" and not msg.done.HasField("baseline")
    assert msg.done.steered.finish_reason == pb.FINISH_REASON_EOS
    feature = t.Feature("s", 1, 1.0, 2.0, 0.1, None, [], [], [t.Neighbour(4, 0.5)], [], None)
    got = convert.response(feature, pb.GetFeatureResponse)
    assert not got.HasField("density") and not got.HasField("direction")
    assert (got.nearest[0].feature, got.nearest[0].cosine) == (4, 0.5)


def test_the_app_answers_every_rpc() -> None:
    """Serve's gRPC proxy calls the deployment's method named as the RPC: every RPC of the
    .proto has one, taking the request and ``grpc_context``."""
    import inspect

    from saescope.service.app import SaeScope

    cls = SaeScope.func_or_class  # type: ignore[attr-defined]  # a serve.Deployment
    for rpc in pb.DESCRIPTOR.services_by_name["SaeScope"].methods_by_name:
        method = getattr(cls, rpc)
        assert list(inspect.signature(method).parameters) == ["self", "request", "grpc_context"]
        assert inspect.iscoroutinefunction(method) or inspect.isasyncgenfunction(method), rpc
