"""One recorded exchange per RPC: how the SDK calls it, what the engine sees, what it answers.

``test_wire_format`` pins these against ``wire_v1.json``: the request bytes the SDK sends, the
domain request the service decodes from them, the response bytes the service encodes from the
domain result, and the SDK's result decoded from those bytes. Re-record (``PYTHONPATH=. python
tests/protos/test_wire_format.py --record``) only for a deliberate, compatible wire change.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from saescope.client import Chat, ablate, add, clamp, direction, multiply
from saescope.service import types as t


@dataclass(frozen=True)
class Case:
    rpc: str
    call: Callable[[Any], Any]
    """The SDK call, given a client (sync: its result; async: an awaitable or a stream)."""
    request: Any
    """The domain request the service decodes (``None`` for GetInfo)."""
    results: list[Any]
    """Domain results the service encodes, one per response message (streams: several)."""


TOK = [
    t.Token(id=1, text="<|im_start|>", start=0, end=12, special=True),
    t.Token(id=504, text="Hello", start=12, end=17),
    t.Token(id=28, text=" é", start=17, end=19),
]
PROMPT = t.Prompt(text="Hello é")
CHAT = t.Prompt(chat=(t.ChatMessage("system", "Be brief."), t.ChatMessage("user", "Hi")))
CHAT_GEN = t.Prompt(chat=CHAT.chat, add_generation_prompt=True)
CHAT_SDK = Chat.of([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])

INFO = t.Info(
    model="HuggingFaceTB/SmolLM2-135M-Instruct",
    dtype="float32",
    device="cpu",
    num_layers=30,
    d_model=576,
    vocab_size=49152,
    has_chat_template=True,
    saes=[
        t.SaeInfo(
            "l15", "model.layers.15", 15, 576, 4608, "relu", 0, {"fvu": 0.307, "l0": 33.9}, 1048576
        ),
        t.SaeInfo("l8", "model.layers.8", 8, 576, 2304, "topk", 32, {}, 4096, True),
    ],
    default_sae_id="l15",
    limits=t.Limits(),
    version="0.3.0",
)

ACTS = t.ActivationsResult(
    sae_id="l15",
    prompts=[
        t.PromptActivations(
            tokens=TOK,
            token_top_features=[
                t.Sparse([], []),
                t.Sparse([7, 3], [2.5, 0.25]),
                t.Sparse([9], [1.0]),
            ],
            feature_values=np.array([[0.0, 1.0], [2.5, 0.0], [0.5, 0.125]], dtype=np.float32),
            top_features=t.Sparse([7, 9], [2.5, 1.0]),
            error_norms=[10.0, 1.5, 2.0],
            residual_norms=[100.0, 9.0, 8.5],
            out_of_distribution=[True, False, False],
        ),
        t.PromptActivations(
            tokens=TOK[:1],
            token_top_features=[t.Sparse([], [])],
            feature_values=np.zeros((1, 2), dtype=np.float32),
            top_features=t.Sparse([], []),
            error_norms=[3.0],
            residual_norms=[4.0],
            out_of_distribution=[False],
        ),
    ],
)

EDITS = [
    t.Intervention(7, "clamp", 8.0, "all"),
    t.Intervention(3, "add", -1.5, "prompt"),
    t.Intervention(9, "multiply", 0.5, "generated"),
    t.Intervention(11, "ablate", 0.0, "all"),
]
TRACE = [t.FeatureTrace(7, [0.0, 1.0, 2.0], [8.0, 8.0, 8.0])]
STEERED = t.Completion("Paris", [TOK[1]], [-0.5], "stop", TRACE)
BASELINE = t.Completion(" é", [TOK[2]], [-1.25], "length", [])
GENERATED = t.GenerationResult("l15", TOK, STEERED, BASELINE)
GENERATE = t.GenerateRequest(
    prompt=CHAT_GEN,
    sae_id="l15",
    interventions=EDITS,
    sampling=t.Sampling(
        max_new_tokens=4, temperature=0.75, top_p=0.875, top_k=20, seed=0, stop=("\n",)
    ),
    include_baseline=True,
    include_logprobs=True,
    include_trace=True,
)
GENERATE_PLAIN = t.GenerateRequest(prompt=PROMPT, sampling=t.Sampling(0, 0.0, 0.0, 0, None, ()))


def _generate(client: Any) -> Any:
    return client.generate(
        CHAT_SDK,
        sae_id="l15",
        interventions=[
            clamp(7, 8.0),
            add(3, -1.5, scope="prompt"),
            multiply(9, 0.5, "generated"),
            ablate(11),
        ],
        max_new_tokens=4,
        temperature=0.75,
        top_p=0.875,
        top_k=20,
        seed=0,
        stop="\n",
        baseline=True,
        logprobs=True,
        trace=True,
    )


HIT = t.ContrastHit(
    feature=7,
    mean_positive=2.5,
    mean_negative=0.125,
    mean_difference=2.375,
    effect_size=3.25,
    auroc=1.0,
    p_value=1e-4,
    p_value_corrected=2e-3,
    frac_active_positive=1.0,
    frac_active_negative=0.25,
    locations=[
        t.FeatureLocation(True, 0, 1, "Hello", 2.5),
        t.FeatureLocation(False, 1, 0, "a", 0.5),
    ],
)
CONTRAST = t.ContrastResult("l15", [HIT], [], 812)
CONTRAST_DIM = t.ContrastResult("l15", [], [HIT], 3, [0.5, -0.25, 0.0], 0.5590169943749475)
VECTOR = [0.5, -0.25, 2.0]

FEATURE = t.Feature(
    sae_id="l15",
    feature=7,
    decoder_norm=1.0,
    encoder_norm=2.5,
    encoder_bias=-0.25,
    density=0.015625,
    promoted=[t.TokenScore(504, "Hello", 3.5)],
    suppressed=[t.TokenScore(28, " é", -2.0)],
    nearest=[t.Neighbour(9, 0.5), t.Neighbour(3, 0.25)],
    top_examples=[t.ActivatingExample(TOK, [0.0, 2.5, 1.0], 2.5)],
    direction=[0.6, -0.8, 0.0],
)
FEATURE_BARE = t.Feature("l15", 3, 1.0, 0.5, 0.0, None, [], [], [], [], None)
EXAMPLE = t.ActivatingExample(TOK[1:], [2.5, 0.0], 2.5, 0)
FEATURE_CATALOG = dataclasses.replace(
    FEATURE_BARE,
    top_examples=[EXAMPLE],
    next_examples_page_token="eyJvIjoxfQ",
    quantile_examples=[t.QuantileBin(0.0, 1.25, []), t.QuantileBin(1.25, 2.5, [EXAMPLE])],
    histogram=t.Histogram([0.0, 1.25, 2.5], [7, 1]),
    label=t.FeatureLabel(
        text="Hello | é",
        tokens=[t.TokenScore(0, "Hello", 2.5)],
        ngrams=[t.TokenScore(0, "Hello é", 1.5)],
        scripts={"Latin": 1.0},
        languages={"en": 0.75, "fr": 0.25},
        detection=t.DetectionScore(0.5, 0.75, 0.375, 0.625, 8, 120),
        explanation="greetings",
    ),
    cofiring=[t.Neighbour(9, 0.5)],
    catalog_tokens=4096,
)
FEATURE_PAGE = t.FeaturePage(
    "l15",
    [t.FeatureSummary(7, 0.015625, "Hello | é", 0.5, 2.5), t.FeatureSummary(9, 0.0, "", None)],
    "eyJvIjoyfQ",
    5,
)
SEARCH = t.FeatureSearch(
    "l15",
    [
        t.SearchHit(7, 0.03125, 1.5, 0.75, "both", "Hello | é", 0.015625),
        t.SearchHit(9, 0.015625, None, 0.5, "activation"),
        t.SearchHit(3, 0.0078125, 2.0, None, "text", "ocean"),
    ],
    True,
)

ATTRIBUTION = t.Attribution(
    sae_id="l15",
    prompt_tokens=TOK,
    read=[False, True, True],
    target=t.Token(id=340, text=" Paris", start=-1, end=-1),
    target_logprob=-1.25,
    features=[
        t.FeatureAttribution(7, 0.75, [0.0, 0.5, 0.25], 2.5),
        t.FeatureAttribution(9, -0.5, [0.0, -0.5, 0.0], 1.0),
    ],
    features_total=0.375,
    error=-0.125,
    error_per_token=[0.0, -0.25, 0.125],
    bias=0.0625,
    skipped=1.5,
    total=1.8125,
)

CASES: dict[str, Case] = {
    "info": Case("GetInfo", lambda c: c.info(), None, [INFO]),
    "tokenize_text": Case(
        "Tokenize",
        lambda c: c.tokenize("Hello é"),
        t.TokenizeRequest(PROMPT),
        [t.Tokenization("<|im_start|>Hello é", TOK)],
    ),
    "tokenize_chat": Case(
        "Tokenize",
        lambda c: c.tokenize(chat=CHAT_SDK),
        t.TokenizeRequest(CHAT),
        [t.Tokenization("x", TOK[:1])],
    ),
    "activations": Case(
        "GetFeatureActivations",
        lambda c: c.activations(
            ["Hello é", CHAT_SDK],
            sae_id="l15",
            top_k=2,
            features=[7, 3],
            top_k_aggregated=4,
            aggregation="mean",
            include_special_tokens=True,
        ),
        t.ActivationsRequest(
            prompts=[PROMPT, CHAT],
            sae_id="l15",
            top_k_per_token=2,
            feature_ids=[7, 3],
            top_k_aggregated=4,
            aggregation="mean",
            include_special_tokens=True,
        ),
        [ACTS],
    ),
    "generate": Case("GenerateSteered", _generate, GENERATE, [GENERATED]),
    "generate_plain": Case(
        "GenerateSteered",
        lambda c: c.generate("Hello é"),
        GENERATE_PLAIN,
        [t.GenerationResult("l15", TOK, t.Completion("", [], [], "eos", []))],
    ),
    "stream": Case(
        "StreamGenerateSteered",
        lambda c: c.stream("Hello é", max_new_tokens=2, logprobs=True),
        t.GenerateRequest(
            prompt=PROMPT, sampling=t.Sampling(2, 0.0, 0.0, 0, None, ()), include_logprobs=True
        ),
        [
            t.TokenEvent("steered", 0, TOK[1], "Hello", -0.5, [8.0]),
            t.TokenEvent("baseline", 0, TOK[2], " é", None, []),
            GENERATED,
        ],
    ),
    "generate_direction": Case(
        "GenerateSteered",
        lambda c: c.generate("Hello é", interventions=[direction(VECTOR, 4.0, "generated")]),
        t.GenerateRequest(
            prompt=PROMPT,
            interventions=[
                t.Intervention(0, "direction", 4.0, "generated", np.array(VECTOR, np.float32))
            ],
            sampling=t.Sampling(0, 0.0, 0.0, 0, None, ()),
        ),
        [t.GenerationResult("l15", TOK, t.Completion("", [], [], "eos", []))],
    ),
    "contrast_direction": Case(
        "SearchFeaturesByContrast",
        lambda c: c.contrast(["Hello é", "Bonjour"], ["Hi", "Hey"]),
        t.ContrastRequest(
            positive=[PROMPT, t.Prompt(text="Bonjour")],
            negative=[t.Prompt(text="Hi"), t.Prompt(text="Hey")],
        ),
        [CONTRAST_DIM],
    ),
    "contrast": Case(
        "SearchFeaturesByContrast",
        lambda c: c.contrast(
            ["Hello é", "Bonjour"], [CHAT_SDK, "Hi"], sae_id="l15", top_n=5, locations=2
        ),
        t.ContrastRequest(
            positive=[PROMPT, t.Prompt(text="Bonjour")],
            negative=[CHAT, t.Prompt(text="Hi")],
            sae_id="l15",
            aggregation="max",
            top_n=5,
            locations_per_hit=2,
        ),
        [CONTRAST],
    ),
    "contrast_output_score": Case(
        "SearchFeaturesByContrast",
        lambda c: c.contrast(["Hello é", "Bonjour"], ["Hi", "Hey"], order_by="output_score"),
        t.ContrastRequest(
            positive=[PROMPT, t.Prompt(text="Bonjour")],
            negative=[t.Prompt(text="Hi"), t.Prompt(text="Hey")],
            order_by="output_score",
        ),
        [
            dataclasses.replace(
                CONTRAST, positive_hits=[dataclasses.replace(HIT, output_score=0.25)]
            )
        ],
    ),
    "generate_conditional": Case(
        "GenerateSteered",
        lambda c: c.generate(
            "Hello é",
            interventions=[
                clamp(7, 0.0).when(7, above=2.5),
                direction(VECTOR, 4.0).when(direction=VECTOR, above=-0.5),
            ],
        ),
        t.GenerateRequest(
            prompt=PROMPT,
            interventions=[
                t.Intervention(7, "clamp", 0.0, condition=t.Condition(feature=7, threshold=2.5)),
                t.Intervention(
                    0,
                    "direction",
                    4.0,
                    direction=np.array(VECTOR, np.float32),
                    condition=t.Condition(direction=np.array(VECTOR, np.float32), threshold=-0.5),
                ),
            ],
            sampling=t.Sampling(0, 0.0, 0.0, 0, None, ()),
        ),
        [
            t.GenerationResult(
                "l15",
                TOK,
                t.Completion("", [], [], "eos", [], [t.Firing(0, [1, 2]), t.Firing(1, [])]),
            )
        ],
    ),
    "feature": Case(
        "GetFeature",
        lambda c: c.feature(7, sae_id="l15", top_logits=1, neighbours=2, direction=True),
        t.FeatureRequest(
            feature=7, sae_id="l15", top_logits=1, neighbours=2, include_direction=True
        ),
        [FEATURE],
    ),
    "feature_bare": Case(
        "GetFeature",
        lambda c: c.feature(3),
        t.FeatureRequest(
            feature=3, sae_id="", top_logits=10, neighbours=10, include_direction=False
        ),
        [FEATURE_BARE],
    ),
    "feature_catalog": Case(
        "GetFeature",
        lambda c: c.feature(3, examples=1, examples_page_token="eyJvIjoxfQ", quantile_examples=2),
        t.FeatureRequest(
            feature=3, examples_page_size=1, examples_page_token="eyJvIjoxfQ", quantile_examples=2
        ),
        [FEATURE_CATALOG],
    ),
    "list_features": Case(
        "ListFeatures",
        lambda c: c.list_features(
            sae_id="l15",
            page_size=2,
            page_token="eyJvIjowfQ",
            min_density=0.0,
            max_density=0.5,
            label="hello",
        ),
        t.ListFeaturesRequest(
            sae_id="l15",
            page_size=2,
            page_token="eyJvIjowfQ",
            min_density=0.0,
            max_density=0.5,
            label_contains="hello",
        ),
        [FEATURE_PAGE],
    ),
    "list_features_bare": Case(
        "ListFeatures",
        lambda c: c.list_features(),
        t.ListFeaturesRequest(),
        [t.FeaturePage("l15", [], "", 0)],
    ),
    "search_features": Case(
        "SearchFeatures",
        lambda c: c.search_features("ocean é", sae_id="l15", top_n=3),
        t.SearchFeaturesRequest(query="ocean é", sae_id="l15", top_n=3),
        [SEARCH],
    ),
    "attribute": Case(
        "AttributeFeatures",
        lambda c: c.attribute(CHAT_SDK, target=" Paris", sae_id="l15", top_n=2),
        t.AttributeRequest(prompt=CHAT_GEN, sae_id="l15", target_text=" Paris", top_n=2),
        [ATTRIBUTION],
    ),
    "attribute_token": Case(
        "AttributeFeatures",
        lambda c: c.attribute("Hello é", target=0),
        t.AttributeRequest(prompt=PROMPT, target_token=0),
        [t.Attribution("l15", TOK[:1], [False], TOK[0], -0.5, [], 0.0, 0.0, [0.0], 0.0, 2.0, 2.0)],
    ),
}
