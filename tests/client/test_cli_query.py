"""``saescope query`` end to end against the real service: ``--json`` parses and agrees with the
SDK, the human output shows the tokens and text, errors exit non-zero without a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from saescope.cli.main import main
from saescope.cli.query import load_prompts
from saescope.client import Client, Info, add, clamp, direction
from tests.support.serve import ServeInstance

PROMPT = "The quick brown fox jumps over the lazy dog"


Query = Callable[..., tuple[int, str, str]]


@pytest.fixture
def query(serve_instance: ServeInstance, capsys: pytest.CaptureFixture[str]) -> Query:
    """Run ``saescope query SUB ARGS...`` in-process; return (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        connection = ["--target", serve_instance.grpc_target, "--application", "saescope"]
        code = main(["query", *connection, *args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def test_info(query: Query, info: Info) -> None:
    code, out, _ = query("info")
    assert code == 0
    assert info.model in out and all(s.sae_id in out for s in info.saes)
    assert "\x1b[" not in out  # no colours when stdout is not a terminal
    code, out, _ = query("info", "--json")
    assert code == 0 and json.loads(out)["default_sae_id"] == info.default_sae_id


def test_tokenize(query: Query, client: Client) -> None:
    expected = client.tokenize(PROMPT)
    code, out, _ = query("tokenize", PROMPT)
    assert code == 0
    for token in expected.tokens:
        assert json.dumps(token.text, ensure_ascii=False) in out
    code, out, _ = query("--json", "tokenize", PROMPT)
    assert [t["id"] for t in json.loads(out)["tokens"]] == expected.ids


def test_activations(query: Query, client: Client) -> None:
    code, out, _ = query("activations", PROMPT, "Paris is big", "--top-k", "2", "--features", "3,7")
    assert code == 0
    assert "prompt 1/2" in out and "prompt 2/2" in out and "f3" in out and "f7" in out
    expected = client.activations(PROMPT, top_k=2, features=[3, 7])
    for tok in expected[0]:
        assert json.dumps(tok.text, ensure_ascii=False) in out
        if tok.top_features:
            top = tok.top_features[0]
            assert f"{top.feature} {top.value:.2f}" in out
    code, out, _ = query("activations", PROMPT, "--top-k", "2", "--features", "3,7", "--json")
    data = json.loads(out)
    assert data["prompts"][0]["feature_ids"] == [3, 7]
    first = data["prompts"][0]["tokens"][0]
    assert first["token"]["id"] == expected[0].tokens[0].token.id
    assert first["feature_values"] == pytest.approx(expected[0].tokens[0].feature_values)


def test_steer_streams_text(query: Query, client: Client) -> None:
    expected = client.generate(
        PROMPT, interventions=[{"feature": 3, "mode": "clamp", "value": 5.0}], max_new_tokens=6
    )
    code, out, err = query("steer", PROMPT, "--clamp", "3=5", "--max-new-tokens", "6")
    assert code == 0
    assert out == expected.text + "\n"  # stdout is the completion alone
    assert "tokens" in err and "finish" in err
    code, out, _ = query("steer", PROMPT, "--clamp", "3=5", "--max-new-tokens", "6", "--json")
    assert json.loads(out)["steered"]["text"] == expected.text


def test_steer_with_baseline_side_by_side(query: Query, client: Client) -> None:
    code, out, _ = query(
        "steer",
        PROMPT,
        "--add",
        "3=20@generated",
        "--ablate",
        "5",
        "--max-new-tokens",
        "4",
        "--baseline",
        "--seed",
        "0",
    )
    assert code == 0
    assert "steered" in out and "baseline" in out and "│" in out
    code, out, _ = query(
        "steer", PROMPT, "--add", "3=20@generated", "--max-new-tokens", "4", "--baseline", "--json"
    )
    data = json.loads(out)
    assert data["baseline"]["text"] == client.generate(PROMPT, max_new_tokens=4).text


def test_contrast_from_files(query: Query, tmp_path: Path, info: Info) -> None:
    positive = tmp_path / "positive.txt"
    positive.write_text("I love Paris\n\nParis in spring\nThe Louvre in Paris\n")
    negative = tmp_path / "negative.jsonl"
    records: list[dict[str, object]] = [{"text": "I love Berlin"}, {"text": "Tokyo at night"}]
    if info.has_chat_template:
        records.append({"messages": [{"role": "user", "content": "Rome is old"}]})
    negative.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert len(load_prompts(positive)) == 3 and len(load_prompts(negative)) == len(records)
    args = ["--positive-file", str(positive), "--negative-file", str(negative), "--top-n", "3"]
    code, out, _ = query("contrast", *args, "--locations", "1")
    assert code == 0 and "features tested" in out and "positive set" in out
    code, out, _ = query("contrast", *args, "--json")
    data = json.loads(out)
    assert data["features_tested"] > 0 and len(data["positive_hits"]) <= 3


def test_steer_with_a_saved_difference_in_means(
    query: Query, client: Client, tmp_path: Path
) -> None:
    """``contrast --save-direction FILE`` writes the vector; ``steer --direction FILE=V`` steers
    with it exactly as the SDK's ``direction()`` does."""
    saved = tmp_path / "paris.json"
    sides = ["--positive", "Paris in spring", "--positive", "I love Paris"]
    sides += ["--negative", "Tokyo at night", "--negative", "Rome is old"]
    code, out, _ = query("contrast", *sides, "--save-direction", str(saved))
    assert code == 0 and "difference in means" in out
    vector = json.loads(saved.read_text())
    assert len(vector) == client.info().sae().d_in
    expected = client.generate(
        PROMPT, interventions=[direction(vector, 30.0, "generated")], max_new_tokens=5
    )
    code, out, _ = query(
        "steer", PROMPT, "--direction", f"{saved}=30@generated", "--max-new-tokens", "5"
    )
    assert code == 0 and out == expected.text + "\n"
    with pytest.raises(SystemExit) as e:  # a usage error: argparse exits 2, naming the file
        query("steer", PROMPT, "--direction", f"{tmp_path / 'missing.json'}=3")
    assert e.value.code == 2


def test_steer_when(query: Query, client: Client, tmp_path: Path) -> None:
    """``--when`` conditions the intervention before it, on a feature or a vector in a file,
    exactly as the SDK's ``.when()``; the summary says where it fired."""
    top = client.activations(PROMPT, top_k_aggregated=1).prompts[0].top_features[0]
    threshold = round(top.value / 2, 3)
    expected = client.generate(
        PROMPT,
        interventions=[clamp(3, 20.0).when(top.feature, above=threshold)],
        max_new_tokens=5,
    )
    assert expected.steered.fired and expected.steered.fired[0].positions
    code, out, err = query(
        "steer",
        PROMPT,
        "--clamp",
        "3=20",
        "--when",
        f"{top.feature}>{threshold}",
        "--max-new-tokens",
        "5",
    )
    n = len(expected.steered.fired[0].positions)
    assert code == 0 and out == expected.text + "\n"
    assert f"intervention 0 fired at {n} positions" in err
    vector = tmp_path / "u.json"
    vector.write_text(json.dumps([1.0] * client.info().sae().d_in))
    code, out, _ = query(
        "steer",
        PROMPT,
        "--add",
        "3=20",
        "--when",
        f"{vector}>0.5",
        "--max-new-tokens",
        "5",
        "--json",
    )
    want = client.generate(
        PROMPT,
        interventions=[add(3, 20.0).when(direction=[1.0] * client.info().sae().d_in, above=0.5)],
        max_new_tokens=5,
    )
    assert code == 0 and json.loads(out)["steered"]["text"] == want.text
    for bad in (["--when", "3>1"], ["--clamp", "3=5", "--when", "3=1"]):
        with pytest.raises(SystemExit) as e:  # usage errors: argparse exits 2
            query("steer", PROMPT, *bad)
        assert e.value.code == 2


def test_contrast_from_arguments(query: Query) -> None:
    code, out, _ = query(
        "--json",
        "contrast",
        "--positive",
        "a cat",
        "--positive",
        "the cat",
        "--negative",
        "a dog",
        "--negative",
        "the dog",
    )
    assert code == 0 and "positive_hits" in json.loads(out)
    code, out, _ = query(
        "contrast",
        "--positive",
        "a cat",
        "--positive",
        "the cat",
        "--negative",
        "a dog",
        "--negative",
        "the dog",
        "--order-by",
        "output_score",
        "--top-n",
        "2",
    )
    header = next(line for line in out.splitlines() if "AUROC" in line)
    assert code == 0 and header.split()[-1] == "output"


def test_feature(query: Query, client: Client) -> None:
    expected = client.feature(3, top_logits=3)
    code, out, _ = query("feature", "3", "--top-logits", "3")
    assert code == 0 and "feature 3" in out
    for score in expected.promoted:
        assert json.dumps(score.token, ensure_ascii=False) in out
    code, out, _ = query("feature", "3", "--json", "--direction")
    assert len(json.loads(out)["direction"]) == client.info().d_model


def test_attribute(query: Query, client: Client) -> None:
    expected = client.attribute(PROMPT, target=" fox", top_n=3)
    code, out, _ = query("attribute", PROMPT, "--target-text", " fox", "--top-n", "3")
    assert code == 0 and 'target " fox"' in out and "total" in out
    for f in expected.features:
        assert f"{f.feature}  " in out and f"{f.attribution:+.3f}" in out
    code, out, _ = query("attribute", PROMPT, "--target-token", str(expected.target.id), "--json")
    data = json.loads(out)
    assert data["target"]["id"] == expected.target.id
    assert data["total"] == pytest.approx(expected.total)
    code, _, err = query("attribute", PROMPT, "--target-text", " the lazy dog")
    assert code == 1 and "INVALID_ARGUMENT: target_text" in err


def test_errors_exit_nonzero_without_traceback(serve_instance: ServeInstance, info: Info) -> None:
    env = {**os.environ, "SAESCOPE_TARGET": serve_instance.grpc_target}
    bad = str(info.sae().d_sae + 10)
    proc = subprocess.run(
        [sys.executable, "-m", "saescope.cli", "query", "feature", bad],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode != 0
    assert proc.stderr.startswith("saescope query: NOT_FOUND: ")
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_unreachable_service(query: Query) -> None:
    code, _, err = query("--target", "127.0.0.1:1", "--timeout", "2", "info")
    assert code == 1 and err.startswith("saescope query: UNAVAILABLE: ")


def test_bad_usage(query: Query, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        query("steer", PROMPT, "--clamp", "3=5@nowhere")
    assert e.value.code == 2
    code, _, err = query("contrast", "--positive", "a", "--positive", "b")
    assert code == 2 and "--negative" in err
