"""The feature catalog (``saescope.training.catalog``) and ``saescope catalog``, on the tiny Llama.

The SAE has planted features: feature 0 fires exactly on one token (its direction separates
that token's residuals from all others at layer 0, where the residual is mostly the token
embedding), and feature 1 is a copy of it (so the two always fire together). The catalog must
find the token, count it exactly, and score the label as a perfect detector. Ray starts once
for the module.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from saescope.cli.main import main
from saescope.training import checkpoint, models, positions
from saescope.training.catalog import (
    Catalog,
    CatalogError,
    OpenAIExplainer,
    build_catalog,
    labels,
    size_formula,
)
from saescope.training.catalog.build import PARTIAL_DIR, _tokenizer, _windows
from saescope.training.catalog.explain import mark
from saescope.training.meta import CheckpointMeta
from saescope.training.sae import SAE, SAEConfig

HOOK = "model.layers.0"
D_SAE = 16
TOKENS = 4096
CONTEXT = 64
SMALL: dict[str, Any] = {
    "tokens": TOKENS,
    "context_size": CONTEXT,
    "shard_windows": 16,
    "workers": 1,
}


@pytest.fixture(scope="module", autouse=True)
def ray_local() -> Iterator[None]:
    import ray

    if ray.is_initialized():  # the suite's Serve instance: the builder uses its free CPUs
        yield
        return
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def planted(
    tiny_model_dir: Path, text_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, int]:
    """A checkpoint whose features 0 and 1 fire on the most common token, and that token."""
    model, tok = models.load_model(str(tiny_model_dir), device="cpu")
    windows, _ = _windows(tok, str(text_dir), TOKENS, CONTEXT, False)
    ids = windows.long()
    attn = ids >= 0
    ids = ids.masked_fill(~attn, tok.pad_token_id)
    h = models.run_to_hookpoints(model, ids, attn, [HOOK])[HOOK]
    special = torch.isin(ids, torch.tensor(tok.all_special_ids))
    read = positions.eligible(special, 1, attn)
    x, t = h[read], ids[read]
    target = int(t.mode().values)
    w = x[t == target].mean(0) - x[t != target].mean(0)
    w = w / w.norm()
    s_hit, s_miss = x[t == target] @ w, x[t != target] @ w
    assert s_hit.min() > s_miss.max(), "the planted token is not linearly separable"
    threshold = float(s_hit.min() + s_miss.max()) / 2
    gain = 10.0 / float(s_hit.mean() - threshold)
    sae = SAE(SAEConfig(d_in=x.shape[1], d_sae=D_SAE))
    sae.init_weights(torch.Generator().manual_seed(0), dec_norm=1.0)
    with torch.no_grad():
        sae.W_enc.mul_(1.0 / float(x.norm(dim=-1).mean()) * 2)
        sae.b_enc.fill_(-0.3)
        for f in (0, 1):
            sae.W_dec[f] = w
            sae.W_enc[:, f] = w * gain
            sae.b_enc[f] = -threshold * gain
    out = tmp_path_factory.mktemp("ck") / "planted"
    meta = CheckpointMeta(
        model=str(tiny_model_dir), hookpoint=HOOK, sae=sae.cfg, skip_first_positions=1
    )
    checkpoint.save_checkpoint(out, sae, meta)
    return out, target


@pytest.fixture(scope="module")
def built(planted: tuple[Path, int], text_dir: Path) -> Catalog:
    path = build_catalog(planted[0], data=str(text_dir), progress=False, **SMALL)
    return Catalog.load(path)


def _read_tokens(cat: Catalog, special: list[int]) -> np.ndarray:
    toks = cat.tokens[:, 1:]  # skip_first_positions = 1
    return toks[(toks >= 0) & ~np.isin(toks, special)]


# ---- what the catalog finds ----------------------------------------------------------------------
def test_planted_feature(built: Catalog, planted: tuple[Path, int], tiny_model_dir: Path) -> None:
    ck, target = planted
    tok = _tokenizer(str(tiny_model_dir))
    checkpoint.verify(ck)  # the catalog folder beside the SAE leaves the checkpoint valid
    top = built.examples(0)
    assert len(top) == built.manifest["top_k"]
    for e in top:
        peak = int(np.argmax(e.values))
        assert e.tokens[peak] == target
        assert e.max_value == pytest.approx(max(e.values), rel=0.01)
        assert e.window % 10 != 9  # held-out windows give no examples
    label = built.label(0)
    assert label["tokens"][0][0] == tok.decode([target]) and label["tokens"][0][2] == target
    assert label["label"]
    det = label["detection"]
    assert det is not None and det["f1"] > 0.95 and det["n_pos"] > 0
    read = _read_tokens(built, tok.all_special_ids)
    assert built.density[0] == pytest.approx(float((read == target).mean()), rel=1e-6)
    assert built.manifest["tokens"] == read.size
    hist = built.histogram(0)
    assert sum(hist.counts) == int((read == target).sum())
    assert len(hist.edges) == built.manifest["hist_bins"] + 1
    assert built.cofiring(0)[0] == (1, pytest.approx(1.0))
    assert built.cofiring(1)[0] == (0, pytest.approx(1.0))
    # quantile bins: examples of bin b have their max inside the bin's edges
    edges = built.bin_edges(0)
    for b in range(built.manifest["bins"]):
        for e in built.examples(0, b):
            assert e.max_value > edges[b] and (b == len(edges) - 2 or e.max_value <= edges[b + 1])
            assert e.tokens[int(np.argmax(e.values))] == target
    summary = built.manifest["summary"]
    assert summary["detection_f1"]["scored"] >= 2
    assert (
        summary["bytes"]["total"]
        == built.size_bytes - (built.root / "manifest.json").stat().st_size
    )


def test_every_feature_counts(built: Catalog) -> None:
    """Histogram counts sum to each feature's firing count; labels cover every feature."""
    counts = built._features["hist_counts"].sum(1)
    fired = np.round(built.density.astype(np.float64) * built.manifest["tokens"])
    assert np.array_equal(counts, fired)
    assert len(built._labels) == D_SAE
    assert all(
        set(lb) >= {"label", "tokens", "ngrams", "scripts", "languages"} for lb in built._labels
    )


def test_shards_merge_exactly(built: Catalog, planted: tuple[Path, int], text_dir: Path) -> None:
    one = Catalog.load(
        build_catalog(
            planted[0], data=str(text_dir), progress=False, **{**SMALL, "shard_windows": 1000}
        )
    )
    assert one.manifest["build"]["shards"] == 1 and built.manifest["build"]["shards"] > 1
    for name in ("top_window", "top_start", "top_max", "top_values", "bin_window", "bin_values"):
        assert np.array_equal(one._examples[name], built._examples[name]), name
    for name in ("density", "hist_counts", "cofire_ids", "cofire_frac"):
        assert np.array_equal(one._features[name], built._features[name]), name


def test_killed_build_resumes(planted: tuple[Path, int], text_dir: Path, tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    shutil.copytree(planted[0], ck, ignore=shutil.ignore_patterns("catalog*"))
    reference = Catalog.load(build_catalog(ck, data=str(text_dir), progress=False, **SMALL))
    shutil.rmtree(ck / "catalog")

    def die(i: int) -> None:
        if i == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_catalog(ck, data=str(text_dir), progress=False, on_shard=die, **SMALL)
    assert not (ck / "catalog").exists() and (ck / PARTIAL_DIR / "shard_00001.safetensors").exists()
    resumed = Catalog.load(build_catalog(ck, data=str(text_dir), progress=False, **SMALL))
    assert resumed.manifest["build"]["resumed_shards"] == 2
    assert not (ck / PARTIAL_DIR).exists()
    for name in reference._examples:
        assert np.array_equal(reference._examples[name], resumed._examples[name]), name
    for name in reference._features:
        assert np.array_equal(reference._features[name], resumed._features[name]), name
    assert reference._labels == resumed._labels


# ---- refusals ------------------------------------------------------------------------------------
def test_corrupt_file_is_refused(built: Catalog, tmp_path: Path) -> None:
    copy = tmp_path / "catalog"
    shutil.copytree(built.root, copy)
    with (copy / "features.safetensors").open("r+b") as fh:
        fh.seek(-1, 2)
        fh.write(b"\x01")
    with pytest.raises(CatalogError, match=r"features\.safetensors"):
        Catalog.load(copy)


def test_catalog_of_another_sae_is_refused(built: Catalog) -> None:
    with pytest.raises(CatalogError, match="sae_weights_sha256"):
        Catalog.load(built.root, sae_weights_sha256="0" * 64)
    Catalog.load(built.root, sae_weights_sha256=built.manifest["sae_weights_sha256"])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"tokens": 0}, "tokens"),
        ({"top_k": 0}, "top_k"),
        ({"bins": -1}, "bins"),
        ({"data": "/no/such/data.jsonl"}, "data"),
    ],
)
def test_bad_arguments_name_the_field(
    planted: tuple[Path, int], kwargs: dict[str, Any], field: str
) -> None:
    with pytest.raises(ValueError, match=f"^{field}: "):
        build_catalog(planted[0], progress=False, **kwargs)


def test_feature_out_of_range(built: Catalog) -> None:
    with pytest.raises(IndexError, match="feature"):
        built.examples(D_SAE)
    with pytest.raises(ValueError, match="kind"):
        built.examples(0, 99)


def test_size_formula() -> None:
    assert size_formula(4096, 1 << 20) < 16e6
    assert size_formula(16384, 1 << 20) < 48e6


# ---- labels, by hand -----------------------------------------------------------------------------
def test_label_pieces_by_hand() -> None:
    vocab = 50_000  # bigram codes prev * vocab + cur overflow int32: they must be int64
    flat = np.array([49_000, 49_001, 7, 49_001], dtype=np.int32)
    held = labels.HeldOut(np.array([0, 1, 3]), flat, context=2, vocab=vocab)
    # position 0 starts a window: no bigram there
    assert set(held.by_bigram) == {49_000 * vocab + 49_001, 7 * vocab + 49_001}
    assert held.predicted(set(), {49_000 * vocab + 49_001}).tolist() == [1]
    assert held.predicted({49_001}, set()).tolist() == [1, 3]
    det = labels.detection(np.array([1, 3]), np.array([3, 5]), n_total=10)
    assert det == {
        "f1": 0.5,
        "precision": 0.5,
        "recall": 0.5,
        "balanced_accuracy": round((0.5 + 7 / 8) / 2, 4),
        "n_pos": 2,
        "n_neg": 8,
    }
    assert labels.detection(np.array([1]), np.array([], dtype=np.int64), 10) is None
    # a token seen often in the foreground and rarely in the background ranks first
    ranked = labels.log_odds(np.array([5, 6]), np.array([8.0, 1.0]), np.array([10, 1000]), 2000)
    assert ranked[0][0] == 5 and all(d > 0 for _, d, _ in ranked)
    assert [labels.script_of(c) for c in "aЖ中1 "] == ["Latin", "Cyrillic", "Han", *["Common"] * 2]


# ---- the explainer, against a stub of the external API -----------------------------------------
class _Stub(BaseHTTPRequestHandler):
    """A stub of an OpenAI-compatible endpoint (the only way to exercise the client here)."""

    seen: list[dict[str, Any]] = []  # noqa: RUF012

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Stub.seen.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
        reply = json.dumps({"choices": [{"message": {"content": " fruit words \n"}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args: Any) -> None:
        pass


def test_openai_explainer(monkeypatch: pytest.MonkeyPatch) -> None:
    server = HTTPServer(("127.0.0.1", 0), _Stub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("STUB_KEY", "secret")
        ex = OpenAIExplainer(
            f"http://127.0.0.1:{server.server_port}/v1", "m", api_key_env="STUB_KEY"
        )
        got = ex.explain([[("I ate a", 0.0), (" banana", 5.0), (".", 0.1)]])
    finally:
        server.shutdown()
    assert got == "fruit words"
    req = _Stub.seen[-1]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer secret"
    assert "I ate a<< banana>>." in req["messages"][1]["content"]
    assert mark([("a", 1.0), ("b", 0.1)]) == "<<a>>b"
    with pytest.raises(ValueError, match="explain_url"):
        OpenAIExplainer("localhost:1", "m")


# ---- the command line ----------------------------------------------------------------------------
def test_cli_end_to_end(
    planted: tuple[Path, int], text_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ck = tmp_path / "ck"
    shutil.copytree(planted[0], ck, ignore=shutil.ignore_patterns("catalog*"))
    argv = ["catalog", str(ck), "--tokens", "2048", "--data", str(text_dir), "--workers", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "detection F1" in out and "bytes" in out
    assert Catalog.load(ck / "catalog").manifest["tokens"] > 0
    assert main(["catalog", str(ck), "--tokens", "0"]) == 2


def test_a_catalog_lives_beside_its_sae_unless_that_is_the_shipped_or_a_read_only_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from saescope.training import default_sae
    from saescope.training.catalog.format import catalog_dir

    monkeypatch.setenv("SAESCOPE_CACHE", str(tmp_path / "cache"))
    digest = "ab" * 32
    writable = tmp_path / "mine"
    writable.mkdir()
    assert catalog_dir(writable, digest) == writable / "catalog"
    cached = tmp_path / "cache" / "catalogs" / digest[:16]
    assert catalog_dir(default_sae.shipped_dir(), digest) == cached
    read_only = tmp_path / "mounted"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        if not os.access(read_only, os.W_OK):  # root writes anywhere: nothing to check then
            assert catalog_dir(read_only, digest) == cached
        (tmp_path / "mounted2" / "catalog").mkdir(parents=True)  # an existing one wins
        assert catalog_dir(tmp_path / "mounted2", digest) == tmp_path / "mounted2" / "catalog"
    finally:
        read_only.chmod(0o755)
