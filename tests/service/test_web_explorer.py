"""The web explorer in a real headless browser (Debian's Chromium, driven by Playwright) against
the real service: an SAE with a planted feature (it fires on " banana" and nowhere else) and a
catalog from the real builder, served by a second app (``saescope-explorer``).

Each test loads a page, types and clicks as a user would, waits for what the service answers,
and checks what is on the page against the same question asked over gRPC. Screenshots go to
each test's temporary folder (``explorer-*.png``). A script error on any page fails the test.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format

from saescope.api.v1 import saescope_pb2 as pb
from tests.service.engine_fixtures import (
    PLANTED_FEATURE,
    PLANTED_TOKEN,
    build_planted_sae,
    build_tiny_model,
    build_tiny_sae,
)
from tests.support.browser import launch
from tests.support.catalog import build_tiny_catalog
from tests.support.serve import TEST_API_KEY, TEST_API_KEY_ENV, TEST_LIMITS, ServeInstance

pytestmark = pytest.mark.slow
pool = ThreadPoolExecutor(1)
APP, KEYED = "saescope-explorer", "saescope-explorer-keyed"
PLANTED, PLAIN = "planted", "plain"
TIMEOUT_MS = 60_000
POSITIVE = [
    "I ate a banana for lunch.",
    "A banana is yellow.",
    "She peeled the banana slowly.",
    "Banana bread needs one ripe banana.",
]
NEGATIVE = [
    "I ate an apple for lunch.",
    "A lemon is yellow.",
    "She peeled the orange slowly.",
    "Corn bread needs one cup of flour.",
]


@pytest.fixture(scope="module")
def explorer(
    serve_instance: ServeInstance, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """The explorer app; yields its address, its call metadata and its app args."""
    root = tmp_path_factory.mktemp("explorer")
    model_dir = build_tiny_model(root / "model")
    # Recording that it never saw a sequence's first position, as a trained SAE does.
    planted = build_planted_sae(root / PLANTED, model_dir, "model.layers.0", skip_first=1)
    build_tiny_catalog(planted, root)
    plain = build_tiny_sae(root / PLAIN, model_dir, "model.layers.1")
    overrides: dict[str, Any] = {
        "model": str(model_dir),
        "saes": [{"sae_id": PLANTED, "path": str(planted)}, {"sae_id": PLAIN, "path": str(plain)}],
        "default_sae_id": PLANTED,
        "limits": TEST_LIMITS,
    }
    with serve_instance.deploy_app(APP, **overrides) as metadata:
        yield {
            "url": f"{serve_instance.http_url}/{APP}/",
            "metadata": metadata,
            "stub": serve_instance.stub(),
            "overrides": overrides,
        }


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with launch() as b:
        yield b


@pytest.fixture
def page(browser: Any, tmp_path: Path) -> Iterator[Any]:
    """A fresh tab (its own sessionStorage); script errors fail the test."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    tab = context.new_page()
    tab.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    tab.on("pageerror", lambda e: errors.append(str(e)))
    # The browser logs every failed fetch; API calls that fail are the page's to show (tests
    # check it does), anything else that fails to load is an error.
    tab.on(
        "response",
        lambda r: (
            errors.append(f"{r.status} {r.url}")
            if r.status >= 400 and "/api/v1/" not in r.url
            else None
        ),
    )
    tab.on(
        "console",
        lambda m: (
            errors.append(m.text)
            if m.type == "error" and not m.text.startswith("Failed to load resource")
            else None
        ),
    )
    yield tab
    context.close()
    assert not errors, f"errors on the page: {errors}"


def shot(page: Any, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"explorer-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000  # a rendered page, not a blank one


def grpc(explorer: dict[str, Any], rpc: str, request: Any) -> Any:
    return getattr(explorer["stub"], rpc)(request, metadata=explorer["metadata"], timeout=120)


def test_the_prefix_without_a_slash_redirects_to_the_page(explorer: dict[str, Any]) -> None:
    with urllib.request.urlopen(explorer["url"].rstrip("/"), timeout=30) as r:
        assert r.url == explorer["url"] and b"saescope explorer" in r.read()


def test_search_finds_the_planted_feature_and_its_page_shows_it(
    page: Any, explorer: dict[str, Any], tmp_path: Path
) -> None:
    page.goto(explorer["url"])
    page.wait_for_selector("#sae option", state="attached")
    assert page.is_hidden("#key-form") and page.is_hidden("#error")
    page.fill("#search-query", "banana")
    page.click("#search-button")
    first = page.locator("#search-hits tbody tr").first
    assert first.locator("a.feature-link").inner_text() == f"#{PLANTED_FEATURE}"
    assert "banana" in first.inner_text()
    shot(page, tmp_path, "search")

    first.locator("a.feature-link").click()
    page.wait_for_selector(f"main[data-rendered='{PLANTED_FEATURE}']")
    expected = grpc(
        explorer,
        "GetFeature",
        pb.GetFeatureRequest(
            sae_id=PLANTED, feature=PLANTED_FEATURE, top_logits=10, neighbours=10,
            examples_page_size=8, quantile_examples=3,
        ),
    )  # fmt: skip
    assert page.inner_text("#feature-label") == expected.label.text
    assert "banana" in expected.label.text
    assert f"F1 {expected.label.detection.f1:.2f}".rstrip("0").rstrip(".") in page.inner_text(
        "#label-score"
    )
    # Top examples, the firing token outlined and shaded most.
    examples = page.locator("#top-examples .example")
    assert examples.count() == len(expected.top_examples)
    peak = examples.first.locator(".tok.peak")
    assert peak.inner_text().strip() == PLANTED_TOKEN.strip()
    values = [float(v) for v in examples.first.locator(".tok").evaluate_all(
        "spans => spans.map(s => s.dataset.value)")]  # fmt: skip
    assert max(values) == pytest.approx(float(peak.get_attribute("data-value")))
    assert peak.evaluate("s => getComputedStyle(s).backgroundColor") != "rgba(0, 0, 0, 0)"
    # The histogram has a bar per bin; output tokens as the service ranks them.
    bars = page.locator("svg.histogram rect.bar")
    assert bars.count() == len(expected.histogram.counts) > 0
    promoted = page.locator("#promoted tbody tr td:first-child").all_inner_texts()
    assert len(promoted) == len(expected.promoted)
    assert page.locator("#quantiles .quantile").count() == len(expected.quantile_examples)
    if expected.next_examples_page_token:
        page.click("#more-examples")
        page.wait_for_function(
            f"document.querySelectorAll('#top-examples .example').length > {examples.count()}"
        )
    shot(page, tmp_path, "feature")


def test_prompt_page_marks_the_sink_and_finds_the_planted_feature(
    page: Any, explorer: dict[str, Any], tmp_path: Path
) -> None:
    text = "I ate a banana at noon"
    page.goto(explorer["url"] + "#/prompt")
    page.fill("#prompt-text", text)
    page.click("#analyse")
    page.wait_for_selector("#prompt-top")
    expected = grpc(
        explorer,
        "GetFeatureActivations",
        pb.GetFeatureActivationsRequest(
            sae_id=PLANTED, prompts=[pb.Prompt(text=text)], top_k_per_token=8, top_k_aggregated=12
        ),
    ).prompts[0]
    spans = page.locator("#prompt-tokens .tok")
    assert spans.count() == len(expected.tokens)
    sinks = spans.evaluate_all("ss => ss.map(s => s.classList.contains('sink'))")
    assert sinks == list(expected.out_of_distribution), [t.text for t in expected.tokens]
    assert sinks[0]
    # The planted token's own features: the planted one first.
    banana = next(i for i, t in enumerate(expected.tokens) if t.text == PLANTED_TOKEN)
    spans.nth(banana).click()
    first = page.locator("#token-features tbody tr").first.locator("a")
    assert first.inner_text() == f"#{PLANTED_FEATURE}"
    # Shade the text by the planted feature: only the planted token lights up.
    row = page.locator("#prompt-top tbody tr", has=page.locator(f"text='#{PLANTED_FEATURE}'"))
    row.locator("button").click()
    page.wait_for_selector(f"#prompt-tokens[data-shaded-by='{PLANTED_FEATURE}']")
    lit = spans.evaluate_all("ss => ss.map(s => s.style.background !== '')")
    assert lit == [i == banana for i in range(len(lit))]
    shot(page, tmp_path, "prompt")
    first.click()
    page.wait_for_selector(f"main[data-rendered='{PLANTED_FEATURE}']")


def steer_and_wait(page: Any) -> None:
    page.click("#generate")
    page.wait_for_selector("#steer-output[data-state='done']")


def test_steering_streams_baseline_and_steered_side_by_side(
    page: Any, explorer: dict[str, Any], tmp_path: Path
) -> None:
    page.goto(explorer["url"] + f"#/steer?f={PLANTED_FEATURE}")
    page.wait_for_selector(".iv .hint a")  # the feature's label and catalog max were looked up
    page.uncheck("#as-chat")
    page.fill("#steer-prompt", "My favourite fruit is")
    page.select_option(".iv-mode", "MODE_ADD")
    page.fill(".iv-value", "40")
    page.fill("#max-tokens", "60")
    page.fill("#temperature", "0")
    # Count the tokens on the page each time it changes: a stream shows them arriving.
    page.evaluate(
        """() => { window.seen = [];
        new MutationObserver(() => window.seen.push(
            document.querySelectorAll('#steered-text .gen, #baseline-text .gen').length))
        .observe(document.getElementById('steer-output'), {subtree: true, childList: true}); }"""
    )
    steer_and_wait(page)
    steered, baseline = page.inner_text("#steered-text"), page.inner_text("#baseline-text")
    expected = grpc(
        explorer,
        "GenerateSteered",
        pb.GenerateSteeredRequest(
            sae_id=PLANTED,
            prompt=pb.Prompt(text="My favourite fruit is"),
            interventions=[
                pb.Intervention(feature=PLANTED_FEATURE, mode=pb.Intervention.MODE_ADD, value=40)
            ],
            sampling=pb.SamplingParams(max_new_tokens=60, temperature=0, seed=1),
            include_baseline=True,
        ),
    )
    assert steered == expected.steered.text and baseline == expected.baseline.text
    assert steered != baseline  # the edit moved the text
    total = int(page.get_attribute("#steer-output", "data-tokens"))
    assert total == len(expected.steered.tokens) + len(expected.baseline.tokens)
    seen = page.evaluate("window.seen")
    assert any(0 < n < total for n in seen), f"all {total} tokens appeared at once: {seen}"
    assert "first token after" in page.inner_text("#steer-status")
    shot(page, tmp_path, "steer")


def test_stop_ends_the_generation_on_the_server(
    page: Any, explorer: dict[str, Any], serve_instance: ServeInstance
) -> None:
    page.goto(explorer["url"] + f"#/steer?f={PLANTED_FEATURE}")
    page.fill("#max-tokens", str(TEST_LIMITS["max_new_tokens"]))
    page.click("#generate")
    page.wait_for_selector("#steered-text .gen")
    handle = serve_instance.handle(APP)
    # Playwright's sync API runs an event loop in this thread: ask the replica from another.
    open_streams = lambda: pool.submit(lambda: handle.stats.remote().result()).result()[  # noqa: E731
        "open_streams"
    ]
    assert open_streams() >= 1
    page.click("#stop")
    page.wait_for_selector("#steer-output[data-state='stopped']")
    deadline = time.monotonic() + 30
    while open_streams() > 0:
        assert time.monotonic() < deadline, "decoding went on after Stop"
        time.sleep(0.2)


def test_contrast_page_finds_the_planted_feature_and_steers_with_its_vector(
    page: Any, explorer: dict[str, Any], tmp_path: Path
) -> None:
    page.goto(explorer["url"] + "#/contrast")
    page.fill("#positive", "\n".join(POSITIVE))
    page.fill("#negative", "\n".join(NEGATIVE))
    page.click("#contrast-run")
    page.wait_for_selector("#positive-hits")
    expected = grpc(
        explorer,
        "SearchFeaturesByContrast",
        pb.SearchFeaturesByContrastRequest(
            sae_id=PLANTED,
            positive=[pb.Prompt(text=t) for t in POSITIVE],
            negative=[pb.Prompt(text=t) for t in NEGATIVE],
            aggregation=pb.AGGREGATION_MAX,
            top_n=10,
            locations_per_hit=3,
        ),
    )
    rows = page.locator("#positive-hits tbody tr")
    assert rows.count() == len(expected.positive_hits)
    assert page.locator("#negative-hits tbody tr").count() == len(expected.negative_hits)
    assert rows.first.locator("a.feature-link").inner_text() == f"#{PLANTED_FEATURE}"
    assert expected.positive_hits[0].feature == PLANTED_FEATURE
    where = rows.first.locator(".where .tok").all_inner_texts()
    assert where and all("banana" in w.lower() for w in where)
    shot(page, tmp_path, "contrast")

    page.click("#steer-vector")
    page.wait_for_selector(".iv[data-kind='direction']")
    assert page.locator(".iv").count() == 1  # the vector alone
    page.uncheck("#as-chat")
    page.fill("#steer-prompt", "Lunch was")
    page.fill(".iv[data-kind='direction'] .iv-value", "8")
    page.fill("#max-tokens", "16")
    page.fill("#temperature", "0")
    steer_and_wait(page)
    vector = pb.Intervention(
        mode=pb.Intervention.MODE_DIRECTION, value=8, direction=expected.difference_in_means
    )
    steered = grpc(
        explorer,
        "GenerateSteered",
        pb.GenerateSteeredRequest(
            sae_id=PLANTED,
            prompt=pb.Prompt(text="Lunch was"),
            interventions=[vector],
            sampling=pb.SamplingParams(max_new_tokens=16, temperature=0, seed=1),
        ),
    )
    assert page.inner_text("#steered-text") == steered.steered.text


def test_errors_name_the_field(page: Any, explorer: dict[str, Any]) -> None:
    page.goto(explorer["url"] + "#/feature/planted/100000")
    page.wait_for_selector("#error:not([hidden])")
    error = page.inner_text("#error")
    assert error.startswith("NOT_FOUND") and "feature" in error


def test_a_keyed_service_asks_for_the_key_and_then_answers(
    page: Any, serve_instance: ServeInstance, explorer: dict[str, Any], tmp_path: Path
) -> None:
    overrides = explorer["overrides"] | {"api_key_env": TEST_API_KEY_ENV}
    with serve_instance.deploy_app(KEYED, **overrides):
        page.goto(f"{serve_instance.http_url}/{KEYED}/#/search?q=banana")
        page.wait_for_selector("#key-form", state="visible")
        assert page.get_attribute("#error", "data-code") == "UNAUTHENTICATED"
        page.fill("#key-input", "not-the-key")
        page.press("#key-input", "Enter")
        page.wait_for_selector("#key-form", state="visible")
        page.fill("#key-input", TEST_API_KEY)
        page.press("#key-input", "Enter")
        page.wait_for_selector("#search-hits")
        assert page.is_hidden("#error")
        info = json_format.MessageToDict(
            grpc(explorer, "GetInfo", pb.GetInfoRequest()), preserving_proto_field_name=True
        )
        options = page.locator("#sae option").all_inner_texts()
        assert [o.split(" ")[0] for o in options] == [s["sae_id"] for s in info["saes"]]
