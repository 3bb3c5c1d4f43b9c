"""Fixtures for the training tests: a tiny random Llama with a tokenizer built offline, text files.

The tokenizer is a byte-level BPE trained here on the fixture text (no hub, no cached model),
with ``<bos>`` added to every encoding, so BOS handling is exercised as with Llama-style models.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

D_MODEL = 64
N_LAYERS = 4
TEXT = (
    "the model reads a sentence and writes its residual stream into every layer while sparse "
    "features fire on words numbers code and punctuation der Hund schläft le chat dort el perro "
    "come def return import class for while if else 0 1 2 3 4 5 6 7 8 9 ( ) [ ] { } : ; , ."
)
WORDS = TEXT.split(" ")


def _documents(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        sentences = [
            " ".join(rng.choices(WORDS, k=rng.randint(4, 14))) for _ in range(rng.randint(1, 6))
        ]
        docs.append(". ".join(sentences).capitalize() + ".")
    return docs


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """The tests' tensors are tiny: one thread is fastest, and on a shared machine OpenMP
    threads spinning against other processes make small ops ~10× slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def text_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory of local text: a .jsonl file of 600 documents and a .txt file."""
    out = tmp_path_factory.mktemp("text")
    with (out / "a.jsonl").open("w") as fh:
        for doc in _documents(600, seed=1):
            fh.write(json.dumps({"text": doc}) + "\n")
    (out / "b.txt").write_text("\n\n".join(_documents(40, seed=2)) + "\n")
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 4-layer Llama of width 64 and its BPE tokenizer, saved to load by path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<bos>", "<eos>", "<pad>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False)
    bpe.train_from_iterator(_documents(300, seed=0), trainer=trainer)
    bpe.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 1)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    cfg = LlamaConfig(
        hidden_size=D_MODEL,
        intermediate_size=128,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("models") / "tiny-llama"
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Path) -> tuple[object, object]:
    """``(model, tokenizer)`` of the tiny Llama, loaded as any model is."""
    from saescope.training.models import load_model

    return load_model(str(tiny_model_dir), device="cpu")
