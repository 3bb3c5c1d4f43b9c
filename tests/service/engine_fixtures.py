"""Tiny, offline building blocks for engine and app tests: a random Llama and SAEs for it.

Import as ``tests.service.engine_fixtures`` (the repository root must be on ``sys.path``:
``python -m pytest`` from the root puts it there). Everything is deterministic (seeded) and
takes well under a second after the tokenizer's first load.

- ``build_tiny_model(dir)``: a random Llama of width 64 with the tiny test tokenizer
  (``tests/support/tiny_tokenizer.py``: SmolLM2's special tokens and chat template, built in the
  session), saved as a normal model directory. Needs no download and no cache.
- ``build_tiny_sae(dir, model_dir, hookpoint)``: an exported SAE checkpoint for that model,
  with a ``sparsity.safetensors`` so feature densities are known.
- ``build_planted_sae(dir, model_dir, hookpoint)``: the same, but feature ``PLANTED_FEATURE``
  fires on the token ``PLANTED_TOKEN`` and nowhere else (for contrast search).
- ``tiny_setup()`` / ``tiny_engine()``: all of the above built once per process in a temporary
  directory, and one ``Engine`` over them (SAEs ``main`` at layer 1, ``topk`` at layer 2,
  ``planted`` at layer 0; small ``TEST_LIMITS``).
"""

from __future__ import annotations

import atexit
import functools
import math
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from saescope.service.types import Limits
from saescope.training import checkpoint
from saescope.training.sae import SAE, SAEConfig
from tests.support.tiny_tokenizer import build_tiny_tokenizer

if TYPE_CHECKING:
    from saescope.service.engine import Engine

D_MODEL = 64
N_LAYERS = 4
PLANTED_TOKEN = " banana"
PLANTED_FEATURE = 0
TEST_LIMITS = Limits(
    max_prompts=8,
    max_tokens_per_prompt=96,
    max_top_k=128,
    max_new_tokens=64,
    max_features=128,
    max_contrast_prompts=16,
)
# Texts to calibrate the planted feature on (the tests use other sentences).
CALIBRATION = (
    "I ate a banana for breakfast and it was ripe.",
    "The banana bread smelled wonderful this morning.",
    "She peeled a banana, then another banana.",
    "Monkeys are said to love a banana more than anything.",
    "The train left the station at noon.",
    "Quantum computers use qubits instead of bits.",
    "def add(a, b):\n    return a + b",
    "Die Katze schläft auf dem Sofa.",
)


def build_tiny_model(
    out_dir: Path, *, num_layers: int = N_LAYERS, seed: int = 0, chat_template: bool = True
) -> Path:
    """Save a random Llama (width 64, ``num_layers`` blocks) and the tiny tokenizer to ``out_dir``.

    With a real model's ``initializer_range`` (0.02) the early residual stream is dominated by
    the token embedding, so a token detector is a linear feature (``build_planted_sae``).
    ``chat_template=False`` saves a tokenizer without a template (to test that error path).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    tok = build_tiny_tokenizer(chat_template=chat_template)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=D_MODEL,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.02,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    if not chat_template:
        # save_pretrained writes the template file only when there is one; make sure none lingers.
        (out_dir / "chat_template.jinja").unlink(missing_ok=True)
    return out_dir


@functools.cache
def _load(model_dir: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return tok, AutoModelForCausalLM.from_pretrained(model_dir).eval()


def residuals(model_dir: Path, hookpoint: str, texts: tuple[str, ...]) -> tuple[Tensor, Tensor]:
    """Residuals ``(N, d)`` at ``hookpoint`` over every token of ``texts``, and their ids ``(N,)``.

    A plain Hugging Face forward (``output_hidden_states``): an independent reference. (The
    last block's entry there is after the final norm: use earlier hookpoints.)
    """
    tok, lm = _load(str(model_dir))
    layer = int(hookpoint.rsplit(".", 1)[1])
    xs, ids = [], []
    with torch.no_grad():
        for text in texts:
            enc = tok(text, return_tensors="pt")["input_ids"]
            xs.append(lm(enc, output_hidden_states=True).hidden_states[layer + 1][0])
            ids.append(enc[0])
    return torch.cat(xs), torch.cat(ids)


def _random_sae(d_sae: int, architecture: str, seed: int, scale: float) -> SAE:
    """Random unit decoder directions in model units, W_enc = scale · W_decᵀ, bias −0.5.

    With ``scale`` the normalisation of DESIGN §4 (E‖x·scale‖² = d_in), each pre-activation is
    about N(0, 1), so roughly a third of the relu features fire on a token.
    """
    k = 8 if architecture == "topk" else None
    cfg = SAEConfig(d_in=D_MODEL, d_sae=d_sae, architecture=architecture, k=k)  # type: ignore[arg-type]
    sae = SAE(cfg)
    sae.init_weights(generator=torch.Generator().manual_seed(seed), dec_norm=1.0)
    with torch.no_grad():
        sae.W_enc.mul_(scale)
        sae.b_enc.fill_(-0.5)
    return sae


def _scale(x: Tensor) -> float:
    """The normalisation scale of DESIGN §4: E‖x·scale‖² = d_in."""
    return math.sqrt(D_MODEL / float(x.pow(2).sum(-1).mean()))


def build_tiny_sae(
    out_dir: Path,
    model_dir: Path,
    hookpoint: str,
    architecture: str = "relu",
    d_sae: int = 128,
    *,
    seed: int = 0,
    sparsity: bool = True,
) -> Path:
    """Write an exported SAE checkpoint for the tiny model at ``hookpoint`` to ``out_dir``.

    Random features (see ``_random_sae``) scaled to the model's residual norm at ``hookpoint``.
    ``sparsity`` adds log10 densities (feature i has density ``density_of(i, d_sae)``).
    """
    x, _ = residuals(model_dir, hookpoint, CALIBRATION)
    sae = _random_sae(d_sae, architecture, seed, _scale(x))
    log_density = None
    if sparsity:
        log_density = -(1.0 + torch.arange(d_sae, dtype=torch.float32) / d_sae)
    meta = checkpoint.CheckpointMeta(
        model=str(model_dir),
        hookpoint=hookpoint,
        sae=sae.cfg,
        tokens_seen=12345,
        metrics={"l0": 12.5, "fvu": 0.25, "dead_fraction": 0.0},
    )
    return checkpoint.save_checkpoint(Path(out_dir), sae, meta, sparsity=log_density)


def build_planted_sae(
    out_dir: Path,
    model_dir: Path,
    hookpoint: str,
    token: str = PLANTED_TOKEN,
    *,
    d_sae: int = 128,
    seed: int = 1,
    skip_first: int = 0,
) -> Path:
    """An SAE like ``build_tiny_sae`` whose feature ``PLANTED_FEATURE`` detects ``token``;
    ``skip_first`` is the positions rule it records (leading positions it never saw).

    Its direction is the difference of the mean residuals at ``token`` and elsewhere over
    ``CALIBRATION``, its bias the midpoint between the weakest projection at the token and the
    strongest elsewhere, its gain such that it reads ≈ 10 on the token. Early in the tiny model
    the residual is mostly the token embedding, so it fires on that token in any text.
    """
    (target,) = _load(str(model_dir))[0](token, add_special_tokens=False)["input_ids"]
    x, ids = residuals(model_dir, hookpoint, CALIBRATION)
    hit, miss = x[ids == target], x[ids != target]
    w = hit.mean(0) - miss.mean(0)
    w = w / w.norm()
    s_hit, s_miss = hit @ w, miss @ w
    if not s_hit.min() > s_miss.max():
        raise RuntimeError("planted feature: the token is not linearly separable here")
    threshold = float(s_hit.min() + s_miss.max()) / 2
    gain = 10.0 / float(s_hit.mean() - threshold)
    sae = _random_sae(d_sae, "relu", seed, _scale(x))
    with torch.no_grad():
        sae.W_dec[PLANTED_FEATURE] = w
        sae.W_enc[:, PLANTED_FEATURE] = w * gain
        sae.b_enc[PLANTED_FEATURE] = -threshold * gain
    meta = checkpoint.CheckpointMeta(
        model=str(model_dir), hookpoint=hookpoint, sae=sae.cfg, skip_first_positions=skip_first
    )
    return checkpoint.save_checkpoint(Path(out_dir), sae, meta)


@dataclass(frozen=True)
class TinySetup:
    root: Path
    model_dir: Path
    saes: dict[str, Path]


@functools.cache
def tiny_setup() -> TinySetup:
    """The tiny model and three SAEs, built once per process (removed at exit)."""
    root = Path(tempfile.mkdtemp(prefix="saescope-tiny-"))
    atexit.register(shutil.rmtree, root, True)
    model_dir = build_tiny_model(root / "model")
    saes = {
        "main": build_tiny_sae(root / "sae-main", model_dir, "model.layers.1"),
        "topk": build_tiny_sae(
            root / "sae-topk", model_dir, "model.layers.2", "topk", seed=1, sparsity=False
        ),
        "planted": build_planted_sae(root / "sae-planted", model_dir, "model.layers.0"),
    }
    return TinySetup(root, model_dir, saes)


@functools.cache
def tiny_engine() -> Engine:
    """One CPU ``Engine`` over ``tiny_setup()``, shared by a process's tests."""
    from saescope.service.engine import Engine

    s = tiny_setup()
    return Engine(
        str(s.model_dir), dict(s.saes), device="cpu", limits=TEST_LIMITS, default_sae_id="main"
    )


def density_of(feature: int, d_sae: int = 128) -> float:
    """The density ``build_tiny_sae`` records for ``feature``."""
    return math.pow(10.0, -(1.0 + feature / d_sae))


def greedy_with_edit(
    engine: Engine, hookpoint: str, ids: list[int], edit: Callable[[Tensor], Tensor], steps: int
) -> list[int]:
    """``steps`` greedy tokens after ``ids`` from a plain loop of full forwards (no KV cache, no
    batching) with ``edit(h) -> h'`` applied to ``hookpoint``'s hidden states ``(1, T, d)``: the
    reference the engine's steered decoding must equal."""

    def hook(_m: torch.nn.Module, _i: object, out: Any) -> Any:
        h = out[0] if isinstance(out, tuple) else out
        edited = edit(h)
        return (edited, *out[1:]) if isinstance(out, tuple) else edited

    tokens = list(ids)
    handle = engine.rt.model.get_submodule(hookpoint).register_forward_hook(hook)
    try:
        with torch.inference_mode():
            for _ in range(steps):
                logits = engine.rt.model(torch.tensor([tokens])).logits[0, -1]
                tokens.append(int(logits.argmax()))
    finally:
        handle.remove()
    return tokens[len(ids) :]
