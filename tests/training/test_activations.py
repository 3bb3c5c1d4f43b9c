"""Activation generation, shuffling and the on-disk cache, on the tiny Llama.

The reference for rows is a plain full forward pass with ``output_hidden_states``: block ``i``'s
output is ``hidden_states[i + 1]`` (the last entry has the final norm applied, so the tests hook
a middle block).
"""

from __future__ import annotations

from itertools import islice
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from saescope.training import activations as act
from saescope.training import models
from saescope.training.activation_cache import ActivationCache, CacheError
from saescope.training.activations import ActivationSource, ModelRows
from saescope.training.config import load_config
from saescope.training.data import DataConfig, iter_texts
from saescope.training.run import open_rows

HOOK, LAYER = "model.layers.1", 1


def model_rows(tiny_model: Any, text_dir: Path, **kw: Any) -> ModelRows:
    model, tok = tiny_model
    opts = {"context_size": 32, "model_batch_size": 4, **kw}
    return ModelRows(model, tok, HOOK, DataConfig(source=str(text_dir)), **opts)


def full_forward(model: Any, ids: Tensor) -> Tensor:
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    return out.hidden_states[LAYER + 1]  # (B, T, d_in)


# ---- rows from the model -----------------------------------------------------------------------
def test_rows_equal_a_full_forward_at_kept_positions(tiny_model: Any, text_dir: Path) -> None:
    model, tok = tiny_model
    rows = model_rows(tiny_model, text_dir)
    texts = list(islice(iter_texts(rows.data), 3))
    contexts = [tok(t)["input_ids"][:32] for t in texts]
    contexts[2] = contexts[2][:20]  # a short context: padded in the batch, padding left out
    got = rows.activations(contexts)  # (n, d_in)
    expected = []
    for c in contexts:  # one at a time, no padding
        ids = torch.tensor([c])
        keep = rows.keep_mask(ids, torch.ones_like(ids))
        expected.append(full_forward(model, ids)[keep])
    assert torch.allclose(got, torch.cat(expected), atol=1e-5)
    # BOS (every context starts with one here) and position 0 are gone, the rest kept
    assert len(got) == sum(len(c) - 1 for c in contexts)


def test_special_tokens_and_first_positions_are_left_out(tiny_model: Any, text_dir: Path) -> None:
    _, tok = tiny_model
    rows = model_rows(tiny_model, text_dir, skip_first_positions=2)
    bos, pad = tok.bos_token_id, tok.pad_token_id
    ids = torch.tensor([[5, 6, bos, 7, 8, pad], [bos, 9, 10, 11, 12, 13]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    keep = rows.keep_mask(ids, mask)
    assert keep.tolist() == [
        [False, False, False, True, True, False],
        [False, False, True, True, True, True],
    ]
    everything = model_rows(
        tiny_model, text_dir, exclude_special_tokens=False, skip_first_positions=0
    )
    assert everything.keep_mask(ids, mask).tolist() == mask.bool().tolist()


def test_documents_are_packed_into_contexts(tiny_model: Any, text_dir: Path) -> None:
    _, tok = tiny_model
    rows = model_rows(tiny_model, text_dir)
    contexts = [rows._next_context() for _ in range(40)]
    assert all(len(c) == 32 for c in contexts)
    stream = [t for c in contexts for t in c]
    # the tokenizer adds BOS itself, so documents need no separator
    expected = [
        t for text in islice(iter_texts(rows.data), rows._documents) for t in tok(text)["input_ids"]
    ]
    assert stream == expected[: len(stream)]
    assert stream.count(tok.bos_token_id) > 1  # several documents per context stream


def test_epochs_read_the_data_again(tiny_model: Any, text_dir: Path) -> None:
    model, tok = tiny_model
    data = DataConfig(source=str(text_dir), max_documents=3)
    one_pass = [t for text in iter_texts(data) for t in tok(text)["input_ids"]]

    def stream(rows: ModelRows) -> list[int]:
        contexts = iter(rows._next_context, [])
        return [t for c in contexts for t in c]

    rows = ModelRows(model, tok, HOOK, data, context_size=32, model_batch_size=4, epochs=2)
    assert stream(rows) == one_pass * 2
    assert rows._epoch == 1
    once = ModelRows(model, tok, HOOK, data, context_size=32, model_batch_size=4)
    assert stream(once) == one_pass
    # a position in the second pass is resumable
    rows.seek({"epoch": 1, "documents": 1, "pending": [], "rows": 0})
    first_doc = len(tok(next(iter_texts(data)))["input_ids"])
    assert stream(rows) == one_pass[first_doc:]


def test_the_forward_pass_stops_after_the_hooked_block(tiny_model: Any, text_dir: Path) -> None:
    model, _ = tiny_model
    ran: list[str] = []
    _, blocks = models.block_list(model)
    watched = {f"block {i}": b for i, b in enumerate(blocks)} | {"norm": model.model.norm}
    handles = [m.register_forward_hook(lambda *_, n=n: ran.append(n)) for n, m in watched.items()]
    try:
        model_rows(tiny_model, text_dir).read(100)
    finally:
        for h in handles:
            h.remove()
    assert ran and set(ran) == {"block 0", "block 1"}


def test_outlier_rows_are_left_out(tiny_model: Any, text_dir: Path) -> None:
    rows = model_rows(tiny_model, text_dir, outlier_norm_factor=10.0)
    x = torch.randn(50, 64, generator=torch.Generator().manual_seed(0))
    x[7] *= 200  # an attention sink's "massive activation"
    kept = rows.drop_outliers(x)
    assert len(kept) == 49 and rows.outliers_dropped == 1
    assert torch.equal(kept, torch.cat([x[:7], x[8:]]))
    assert torch.equal(model_rows(tiny_model, text_dir).drop_outliers(x), x)  # None: off


def test_non_finite_activations_are_a_clear_error(
    tiny_model: Any, text_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def nan_forward(model: Any, ids: Tensor, mask: Any, hooks: list[str]) -> dict[str, Tensor]:
        return {hooks[0]: torch.full((*ids.shape, 64), float("nan"))}

    monkeypatch.setattr(act, "run_to_hookpoints", nan_forward)
    with pytest.raises(ValueError, match=r"NaN/inf at model\.layers\.1"):
        model_rows(tiny_model, text_dir).read(10)


# ---- shuffling and resuming ----------------------------------------------------------------------
class CountingRows:
    """Row ``i`` is ``[i, i]``: shows where every row of a batch came from."""

    d_in = 2

    def __init__(self, n: int) -> None:
        self.n, self.i = n, 0

    def position(self) -> dict[str, int]:
        return {"i": self.i}

    def seek(self, position: dict[str, int]) -> None:
        self.i = position["i"]

    def read(self, n: int) -> Tensor | None:
        if self.i >= self.n:
            return None
        stop = min(self.i + n, self.n)
        out = torch.arange(self.i, stop, dtype=torch.float32)[:, None].repeat(1, 2)
        self.i = stop
        return out


def ids(batches: list[Tensor]) -> list[list[int]]:
    return [b[:, 0].long().tolist() for b in batches]


def test_shuffle_buffer_mixes_deterministically_by_seed() -> None:
    def run(seed: int) -> list[list[int]]:
        return ids(
            list(ActivationSource(CountingRows(100), batch_size=8, buffer_tokens=32, seed=seed))
        )

    a = run(0)
    assert a == run(0) and a != run(1)
    assert len(a) == 12  # 3 full blocks of 4 batches; the last 4 rows make no batch
    for block in range(3):  # each block is a permutation of its 32 rows
        rows = sorted(r for batch in a[4 * block : 4 * block + 4] for r in batch)
        assert rows == list(range(32 * block, 32 * block + 32))
    # rows of a batch come from across the buffer (contexts of 8 rows: several per batch)
    assert all(len({r // 8 for r in batch}) >= 2 for batch in a)


@pytest.mark.parametrize(("consumed", "lag"), [(5, 0), (8, 0), (6, 3)])
def test_the_source_resumes_exactly(consumed: int, lag: int) -> None:
    whole = ids(list(ActivationSource(CountingRows(100), batch_size=8, buffer_tokens=32, seed=3)))
    src = ActivationSource(CountingRows(100), batch_size=8, buffer_tokens=32, seed=3)
    it = iter(src)
    list(islice(it, consumed + lag))  # a consumer may have looked ahead
    position = src.position(consumed)
    again = ActivationSource(CountingRows(100), batch_size=8, buffer_tokens=32, seed=3)
    again.restore(position)
    assert ids(list(again)) == whole[consumed:]


def test_model_rows_resume_exactly_mid_forward_pass(tiny_model: Any, text_dir: Path) -> None:
    def source() -> ActivationSource:
        return ActivationSource(
            model_rows(tiny_model, text_dir), batch_size=20, buffer_tokens=60, seed=0
        )

    whole = list(islice(source(), 15))
    src = source()
    list(islice(src, 10))
    position = src.position(10)  # block 3, batch 1; the block starts inside a forward pass
    assert position["batch"] == 1 and position["rows"]["rows"] > 0
    again = source()
    again.restore(position)
    rest = list(islice(again, 5))
    assert all(torch.equal(a, b) for a, b in zip(whole[10:], rest, strict=True))


# ---- the on-disk cache ---------------------------------------------------------------------------
def cache_config(tiny_model_dir: Path, text_dir: Path, cache: Path, tokens: int) -> Any:
    return load_config(
        None,
        [
            f"model={tiny_model_dir}",
            f"hookpoint={HOOK}",
            f"data.source={text_dir}",
            f"train.total_tokens={tokens}",
            "train.batch_size=64",
            "activations.shuffle_buffer_tokens=256",
            "activations.context_size=32",
            "activations.model_batch_size=4",
            f"activations.cache_dir={cache}",
            "activations.device=cpu",
        ],
    )


def test_the_cache_is_written_once_and_equals_fresh_rows(
    tiny_model_dir: Path, text_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = cache_config(tiny_model_dir, text_dir, tmp_path / "cache", tokens=1000)
    rows, info = open_rows(cfg)
    assert info == {"model": str(tiny_model_dir), "hookpoint": HOOK}
    cached = rows.read(10_000)
    assert cached is not None and len(cached) == 1024  # whole shuffle blocks: 4 × 256
    manifest = rows.manifest  # type: ignore[attr-defined]
    assert manifest["n_tokens"] == 1024 and manifest["shards"] and not manifest["exhausted"]

    fresh_rows, _ = act_rows(cfg)
    fresh = fresh_rows.read(1024)
    assert fresh is not None and torch.equal(cached, fresh)

    def no_model(*_: Any, **__: Any) -> Any:
        raise AssertionError("the model ran although the cache covers the run")

    monkeypatch.setattr(models, "load_model", no_model)
    again, _ = open_rows(cache_config(tiny_model_dir, text_dir, tmp_path / "cache", tokens=600))
    reread = again.read(10_000)
    assert reread is not None and torch.equal(reread, cached)


def test_a_bfloat16_model_is_cached_in_bfloat16_and_trained_in_float32(
    tiny_model_dir: Path, text_dir: Path, tmp_path: Path
) -> None:
    cfg = cache_config(tiny_model_dir, text_dir, tmp_path / "cache", tokens=200)
    cfg.activations.dtype = "bfloat16"
    rows, _ = open_rows(cfg)
    assert rows.manifest["dtype"] == "bfloat16"  # type: ignore[attr-defined]
    batch = next(iter(ActivationSource(rows, batch_size=64, buffer_tokens=256)))
    assert batch.dtype == torch.float32 and batch.shape == (64, 64)


def act_rows(cfg: Any) -> tuple[ModelRows, dict[str, Any]]:
    from saescope.training.run import model_rows as build

    return build(cfg)


def test_a_short_cache_is_rebuilt_and_a_corrupt_one_refused(
    tiny_model_dir: Path, text_dir: Path, tmp_path: Path
) -> None:
    small = cache_config(tiny_model_dir, text_dir, tmp_path / "cache", tokens=200)
    big = cache_config(tiny_model_dir, text_dir, tmp_path / "cache", tokens=600)
    first, _ = open_rows(small)
    head = first.read(256)
    assert head is not None
    second, _ = open_rows(big)  # same key, more tokens: rebuilt; the old rows are its prefix
    assert second.manifest["n_tokens"] == 768  # type: ignore[attr-defined]
    rows = second.read(768)
    assert rows is not None and torch.equal(rows[:256], head)

    cache = ActivationCache(tmp_path / "cache", {})
    shard = next((tmp_path / "cache").glob("*/shard_00000.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    reader, _ = open_rows(big)
    with pytest.raises(CacheError, match=r"shard_00000\.safetensors"):
        reader.read(10)
    assert not cache.covers(1)  # an unrelated key has no cache


# ---- the default model -------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.default_model
def test_default_model_attention_sinks_are_left_out(
    text_dir: Path, default_model_dir: Path
) -> None:
    """SmolLM2's first position (and a few later ones) carry ~100× norms; training skips them."""
    model, tok = models.load_model(str(default_model_dir), device="cpu")
    data = DataConfig(source=str(text_dir))
    hook = "model.layers.15"

    def norms(**kw: Any) -> Tensor:
        rows = ModelRows(model, tok, hook, data, context_size=64, model_batch_size=8, **kw)
        x = rows.read(8 * 63)
        assert x is not None
        return x.norm(dim=1)

    raw = norms(skip_first_positions=0)
    assert raw.max() > 50 * raw.median()  # the sinks are there
    kept = norms(skip_first_positions=1, outlier_norm_factor=10.0)
    assert kept.max() < 10 * kept.median()
