"""Tiny random models of each architecture family the service supports, built from a config.

``build_family_model(family, dir)`` saves a random model of width 64 (``engine_fixtures.D_MODEL``)
with the tiny test tokenizer (``tests/support/tiny_tokenizer.py``), like
``engine_fixtures.build_tiny_model`` does for Llama, so ``engine_fixtures.build_tiny_sae`` can
write an SAE for it. ``FAMILIES`` names the families, ``SLIDING`` those with sliding-window
layers; ``hookpoint(family, layer)`` is a block's name there (``model.layers.N``,
``transformer.h.N``, ``gpt_neox.layers.N``).

The sliding-window families get a window of ``WINDOW`` tokens, shorter than the tests' prompts
plus generations, so that the window matters: Mistral slides in every layer, Gemma-2 in every
other layer, Gemma-3 in all but one (hybrid caches).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tests.service.engine_fixtures import D_MODEL
from tests.support.tiny_tokenizer import build_tiny_tokenizer

N_LAYERS = 4
WINDOW = 6  # tokens a sliding-window layer attends to (its own included)


def _common(tok: Any, family: str) -> dict[str, Any]:
    return {
        "vocab_size": len(tok),
        # Large enough that greedy decoding wanders instead of repeating one token (a test of
        # the KV cache then sees different tokens at every step); Gemma scales its embeddings
        # by √d_model = 8, so it is there already with a real model's 0.02.
        "initializer_range": 0.02 if family.startswith("gemma") else 0.3,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "tie_word_embeddings": True,
    }


def _llama_like(**extra: Any) -> dict[str, Any]:
    return {
        "hidden_size": D_MODEL,
        "intermediate_size": 128,
        "num_hidden_layers": N_LAYERS,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        **extra,
    }


def _gemma(**extra: Any) -> dict[str, Any]:
    return _llama_like(head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW, **extra)


def _config(family: str, tok: Any) -> Any:
    import transformers as tf

    c = _common(tok, family)
    make: dict[str, Callable[[], Any]] = {
        "llama": lambda: tf.LlamaConfig(**_llama_like(), **c),
        "qwen2": lambda: tf.Qwen2Config(**_llama_like(), **c),
        "qwen3": lambda: tf.Qwen3Config(**_llama_like(head_dim=16), **c),
        "mistral": lambda: tf.MistralConfig(**_llama_like(sliding_window=WINDOW), **c),
        # Gemma-2: sliding and full layers alternate; both soft-cappings on, as the real model.
        "gemma2": lambda: tf.Gemma2Config(
            **_gemma(final_logit_softcapping=30.0, attn_logit_softcapping=50.0), **c
        ),
        "gemma3": lambda: tf.Gemma3TextConfig(
            **_gemma(
                layer_types=["sliding_attention"] * 2 + ["full_attention", "sliding_attention"]
            ),
            **c,
        ),
        "gpt2": lambda: tf.GPT2Config(
            n_embd=D_MODEL, n_layer=N_LAYERS, n_head=4, n_positions=512, **c
        ),
        "gpt_neox": lambda: tf.GPTNeoXConfig(**_llama_like(num_key_value_heads=4), **c),
    }
    return make[family]()


FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "gpt2", "gpt_neox")
SLIDING = ("mistral", "gemma2", "gemma3")
_BLOCKS = {"gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers"}


def hookpoint(family: str, layer: int) -> str:
    """The dotted name of block ``layer`` in a model of ``family``."""
    return f"{_BLOCKS.get(family, 'model.layers')}.{layer}"


def build_family_model(family: str, out_dir: Path, *, seed: int = 0) -> Path:
    """Save a random ``family`` model (width 64, 4 blocks) and the tiny tokenizer to ``out_dir``."""
    from transformers import AutoModelForCausalLM

    tok = build_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(_config(family, tok)).eval()
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return Path(out_dir)
