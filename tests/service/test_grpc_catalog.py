"""The feature catalog through the real service: an SAE with a planted feature (it fires on
" banana" and nowhere else) gets a catalog from the real builder, and a second app serves it
(``saescope-catalog``) beside an SAE without one.

GetFeature's examples peak at the planted token and page without gaps or overlaps; ListFeatures
pages and filters; SearchFeatures finds the planted feature by its label and by a text holding
its token; every new field refuses bad input naming itself; the SDK, the CLI and the Node
client read it all. Loading refuses a corrupt catalog and another SAE's, naming the sae_id.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from grpc import StatusCode as Code

from saescope.api.v1 import saescope_pb2 as pb
from saescope.cli.main import main
from saescope.client import Client, FailedPrecondition, Feature
from saescope.service.runtime import load_saes
from tests.client.conftest import NODE_DIR
from tests.client.conftest import node as node  # the fixture: `node` on this machine
from tests.service.engine_fixtures import (
    PLANTED_FEATURE,
    PLANTED_TOKEN,
    build_planted_sae,
    build_tiny_model,
    build_tiny_sae,
)
from tests.support.catalog import build_tiny_catalog
from tests.support.serve import TEST_LIMITS, ServeInstance

pytestmark = pytest.mark.slow
APP = "saescope-catalog"
PLANTED, PLAIN = "planted", "plain"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny model, the planted SAE with its catalog, and an SAE without one (built before
    Serve is asked for: the builder runs its own Ray)."""
    root = tmp_path_factory.mktemp("catalog")
    model_dir = build_tiny_model(root / "model")
    planted = build_planted_sae(root / PLANTED, model_dir, "model.layers.0")
    build_tiny_catalog(planted, root)
    plain = build_tiny_sae(root / PLAIN, model_dir, "model.layers.1")
    return {"root": root, "model": model_dir, PLANTED: planted, PLAIN: plain}


@pytest.fixture(scope="module")
def app(
    built: dict[str, Path], serve_instance: ServeInstance
) -> Iterator[tuple[tuple[tuple[str, str], ...], Client]]:
    saes = [{"sae_id": k, "path": str(built[k])} for k in (PLANTED, PLAIN)]
    overrides: dict[str, Any] = {
        "model": str(built["model"]),
        "saes": saes,
        "default_sae_id": PLANTED,
        "limits": TEST_LIMITS,
    }
    with (
        serve_instance.deploy_app(APP, **overrides) as metadata,
        Client(serve_instance.grpc_target, application=APP, timeout=60.0) as client,
    ):
        yield metadata, client


@pytest.fixture(scope="module")
def client(app: tuple[Any, Client]) -> Client:
    return app[1]


@pytest.fixture(scope="module")
def planted(client: Client) -> Feature:
    return client.feature(PLANTED_FEATURE, examples=32, quantile_examples=3)


# ---- GetFeature ------------------------------------------------------------------------------
def test_info_says_which_sae_has_a_catalog(client: Client) -> None:
    saes = {s.sae_id: s for s in client.info().saes}
    assert saes[PLANTED].has_catalog and not saes[PLAIN].has_catalog


def test_examples_peak_at_the_planted_token(planted: Feature) -> None:
    assert planted.catalog_tokens > 0
    assert len(planted.top_examples) >= 8
    values = [x.max_value for x in planted.top_examples]
    assert values == sorted(values, reverse=True)
    for x in planted.top_examples:
        assert x.max_token.text == PLANTED_TOKEN
        assert x.values[x.max_position] == pytest.approx(x.max_value, rel=1e-2)
        assert all(v <= 0.01 * x.max_value for i, v in enumerate(x.values) if i != x.max_position)
    assert planted.label is not None and "banana" in planted.label.text
    assert planted.label.detection is not None and planted.label.detection.f1 > 0.9
    assert planted.histogram is not None and planted.histogram.total > 0
    bins = planted.quantile_examples
    assert len(bins) == 3 and bins[0].lower == 0.0
    assert all(a.upper == b.lower for a, b in itertools.pairwise(bins))
    for b in bins:
        assert len(b.examples) <= 3
        assert all(b.lower <= x.max_value for x in b.examples)


def test_example_pages_are_disjoint_and_cover_all(client: Client, planted: Feature) -> None:
    assert planted.next_examples_page_token == ""  # 32 hold them all
    pages: list[Any] = []
    token = ""
    while True:
        page = client.feature(PLANTED_FEATURE, examples=5, examples_page_token=token)
        assert 0 < len(page.top_examples) <= 5
        pages += page.top_examples
        if not (token := page.next_examples_page_token):
            break
    assert pages == planted.top_examples


# ---- ListFeatures ----------------------------------------------------------------------------
def test_list_features_pages_through_every_feature(client: Client) -> None:
    d_sae = client.info().sae(PLANTED).d_sae
    first = client.list_features(page_size=7)
    assert first.total == d_sae and len(first) == 7 and first.next_page_token
    listed = [f.feature for f in client.iter_features(page_size=7)]
    assert listed == list(range(d_sae))
    assert len(client.list_features()) == TEST_LIMITS["max_top_k"]  # the default 50, capped


def test_list_features_filters(client: Client) -> None:
    rare = client.list_features(max_density=0.05, page_size=32)
    assert rare.total > 0 and all(f.density <= 0.05 for f in rare)
    assert PLANTED_FEATURE in [f.feature for f in client.iter_features(max_density=0.05)]
    dense = list(client.iter_features(min_density=0.05, max_density=1.0))
    assert dense and all(0.05 <= f.density <= 1.0 for f in dense)
    named = list(client.iter_features(label="BANANA"))
    assert PLANTED_FEATURE in [f.feature for f in named]
    assert all("banana" in f.label.lower() for f in named)
    top = next(f for f in named if f.feature == PLANTED_FEATURE)
    assert top.label_f1 is not None and top.label_f1 > 0.9 and top.max_value > 5


def test_list_features_without_a_catalog(client: Client) -> None:
    with pytest.raises(FailedPrecondition, match="catalog"):
        client.list_features(sae_id=PLAIN)


# ---- SearchFeatures --------------------------------------------------------------------------
def test_search_finds_the_planted_feature_by_its_label(client: Client) -> None:
    # "banana" alone is not the token " banana": the feature does not fire on it.
    found = client.search_features("banana", top_n=10)
    assert found.has_catalog
    hit = next(h for h in found.hits if h.feature == PLANTED_FEATURE)
    assert hit.matched in ("text", "both") and hit.text_score is not None
    assert "banana" in hit.label and hit.density is not None
    scores = [h.score for h in found.hits]
    assert scores == sorted(scores, reverse=True)


def test_search_finds_the_planted_feature_by_firing(client: Client) -> None:
    found = client.search_features("Monkeys peel a banana slowly", top_n=10)
    hit = next(h for h in found.hits if h.feature == PLANTED_FEATURE)
    assert hit.matched in ("activation", "both")
    assert hit.activation_score is not None and hit.activation_score > 0.3


def test_search_without_a_catalog_matches_by_activation(client: Client) -> None:
    found = client.search_features("The quiet ocean at night", sae_id=PLAIN, top_n=5)
    assert not found.has_catalog and len(found.hits) == 5
    assert {h.matched for h in found.hits} == {"activation"}
    values = [h.activation_score for h in found.hits]
    assert values == sorted(values, reverse=True)  # type: ignore[type-var]


# ---- bad input to every new field ------------------------------------------------------------
def _token(feature: int, sae_id: str = "") -> Callable[[Client], str]:
    """A real next-page token of a feature's examples."""
    return lambda c: c.feature(feature, sae_id=sae_id, examples=1).next_examples_page_token


def _list_token(**filters: Any) -> Callable[[Client], str]:
    """A real next-page token of a listing with other filters."""
    return lambda c: c.list_features(page_size=1, **filters).next_page_token


def _call(rpc: str, message: Any) -> Callable[..., tuple[str, Callable[[Client], Any]]]:
    """``(rpc, request of a client)``; a callable keyword is given the client (tokens)."""

    def of(**kw: Any) -> tuple[str, Callable[[Client], Any]]:
        return rpc, lambda c: message(**{k: v(c) if callable(v) else v for k, v in kw.items()})

    return of


get = _call("GetFeature", pb.GetFeatureRequest)
ls = _call("ListFeatures", pb.ListFeaturesRequest)
search = _call("SearchFeatures", pb.SearchFeaturesRequest)
INVALID, OUT, NOT_FOUND = Code.INVALID_ARGUMENT, Code.OUT_OF_RANGE, Code.NOT_FOUND
BAD: list[tuple[str, Callable[[Client], Any], Code, str]] = [
    (*get(examples_page_size=-1), INVALID, "examples_page_size"),
    (*get(examples_page_size=10**6), OUT, "examples_page_size"),
    (*get(quantile_examples=-2), INVALID, "quantile_examples"),
    (*get(quantile_examples=10**6), OUT, "quantile_examples"),
    (*get(examples_page_token="nope!"), INVALID, "examples_page_token"),
    (*get(feature=0, examples_page_token=_token(1)), INVALID, "examples_page_token"),
    (*get(sae_id=PLAIN, examples_page_token=_token(0)), INVALID, "examples_page_token"),
    (*ls(page_size=-1), INVALID, "page_size"),
    (*ls(page_size=10**6), OUT, "page_size"),
    (*ls(page_token="%%%"), INVALID, "page_token"),
    (*ls(page_token=_list_token(label="banana")), INVALID, "page_token"),
    (*ls(min_density=-0.5), INVALID, "min_density"),
    (*ls(max_density=1.5), INVALID, "max_density"),
    (*ls(min_density=0.5, max_density=0.1), INVALID, "min_density"),
    (*ls(min_density=float("nan")), INVALID, "min_density"),
    (*ls(label_contains="x" * 10_000), OUT, "label_contains"),
    (*ls(sae_id="nope"), NOT_FOUND, "sae_id"),
    (*ls(sae_id=PLAIN), Code.FAILED_PRECONDITION, "catalog"),
    (*search(), INVALID, "query"),
    (*search(query=" \n "), INVALID, "query"),
    (*search(query="a " * 100), OUT, "limit of 96"),
    (*search(query="x" * 10**5), OUT, "query"),
    (*search(query="ok", top_n=-1), INVALID, "top_n"),
    (*search(query="ok", top_n=10**6), OUT, "top_n"),
    (*search(query="ok", sae_id="nope"), NOT_FOUND, "sae_id"),
]


@pytest.mark.parametrize(("rpc", "request_of", "code", "names"), BAD)
def test_bad_input_names_its_field(
    app: tuple[tuple[tuple[str, str], ...], Client],
    serve_instance: ServeInstance,
    rpc: str,
    request_of: Callable[[Client], Any],
    code: Code,
    names: str,
) -> None:
    metadata, client = app
    stub = serve_instance.stub()
    with pytest.raises(grpc.RpcError) as e:
        getattr(stub, rpc)(request_of(client), metadata=metadata, timeout=60)
    assert e.value.code() == code, e.value.details()
    details = e.value.details() or ""
    assert names in details and "Traceback" not in details
    if code == Code.INVALID_ARGUMENT:
        assert details.startswith(names)


# ---- the CLI and the Node client -------------------------------------------------------------
def test_cli(serve_instance: ServeInstance, capsys: pytest.CaptureFixture[str]) -> None:
    def query(*args: str) -> str:
        connection = ["--target", serve_instance.grpc_target, "--application", APP]
        assert main(["query", *connection, *args]) == 0
        return capsys.readouterr().out

    out = query("feature", str(PLANTED_FEATURE), "--examples", "3")
    assert "label" in out and "F1" in out and "histogram" in out
    lines = out.splitlines()
    top = next(i for i, line in enumerate(lines) if line.startswith("  top examples"))
    assert all(f"«{PLANTED_TOKEN}»" in line for line in lines[top + 1 : top + 4])
    assert "values in [" in out and "\x1b[" not in out
    out = query("features", "--label", "banana", "--max-density", "0.05")
    assert f"\n  {PLANTED_FEATURE} " in out and "banana" in out
    out = query("features", "--all", "--json", "--page-size", "32")
    assert len(out.splitlines()) == 128
    out = query("search", "banana", "--top-n", "10", "--json")
    hits = {h["feature"]: h for h in json.loads(out)["hits"]}
    assert hits[PLANTED_FEATURE]["matched"] in ("text", "both")
    assert "matched" in query("search", "a banana split")


NODE_SCRIPT = """
const { SaeScopeClient } = require('./index');
(async () => {
  const client = new SaeScopeClient({ target: process.argv[1], application: process.argv[2] });
  try {
    const f = await client.feature(0, { examples: 2 });
    const x = f.topExamples[0];
    console.log(`label: ${f.label.text}; peak: ${JSON.stringify(x.tokens[x.maxPosition].text)}`);
    const page = await client.listFeatures({ label: 'banana', maxDensity: 0.05 });
    console.log(`listed: ${page.features.map((s) => s.feature).join(',')} of ${page.total}`);
    let n = 0;
    for await (const s of client.iterFeatures({ pageSize: 32 })) n += s.feature >= 0 ? 1 : 0;
    console.log(`all: ${n}`);
    const found = await client.searchFeatures('banana', { topN: 10 });
    const hit = found.hits.find((h) => h.feature === 0);
    console.log(`search: ${hit.matched}`);
  } finally {
    client.close();
  }
})().catch((e) => { console.error(e.message); process.exit(1); });
"""


def test_node_client(serve_instance: ServeInstance, client: Client, node: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("SAESCOPE_API_KEY", "SAESCOPE_TARGET")}
    proc = subprocess.run(
        [node, "-e", NODE_SCRIPT, serve_instance.grpc_target, APP],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    label = client.feature(PLANTED_FEATURE).label
    assert label is not None and f"label: {label.text}; peak: {json.dumps(PLANTED_TOKEN)}" in out
    page = client.list_features(label="banana", max_density=0.05)
    assert f"listed: {','.join(str(f.feature) for f in page)} of {page.total}" in out
    assert "all: 128" in out and ("search: text" in out or "search: both" in out)


# ---- loading -----------------------------------------------------------------------------------
def test_load_refuses_a_corrupt_catalog_or_another_saes(
    built: dict[str, Path], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(built["model"])
    cpu = torch.device("cpu")
    other = shutil.copytree(built[PLAIN], tmp_path / "other")
    shutil.copytree(built[PLANTED] / "catalog", other / "catalog")
    with pytest.raises(ValueError, match=r"saes\['other'\]: .*another SAE"):
        load_saes(model, {"other": other}, device=cpu)
    broken = shutil.copytree(built[PLANTED], tmp_path / "broken")
    labels = broken / "catalog" / "labels.json"
    labels.write_text(labels.read_text().replace("banana", "ananas"))
    with pytest.raises(ValueError, match=r"saes\['broken'\]: .*sha256"):
        load_saes(model, {"broken": broken}, device=cpu)
    loaded = load_saes(model, {"ok": built[PLANTED]}, device=cpu)["ok"]
    assert loaded.catalog is not None and loaded.info().has_catalog
