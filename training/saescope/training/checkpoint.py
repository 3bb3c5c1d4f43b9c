"""SAE checkpoints: directories SAELens can load, written atomically, verified on load.

Layout of a checkpoint directory::

    cfg.json                  SAELens config (architecture, d_in, d_sae, metadata: model, hook
                              as TransformerLens names it and as ``hf_hook_name``)
    sae_weights.safetensors   W_enc, b_enc, W_dec, b_dec (+ threshold: jumprelu, batchtopk,
                              matryoshka) — the exported SAE, in model units
    sparsity.safetensors      "sparsity": log10 feature density over the last window (optional)
    saescope.json             saescope's metadata (``meta.CheckpointMeta``): model, hookpoint,
                              scale, tokens, metrics, data rules, config, and ``files``: the
                              sha256 of every other file
    training_state/           (optional) what resuming needs: raw weights, optimizer, RNG, data
                              position — tensors in safetensors, the rest in JSON; never pickle

A checkpoint is built in a temporary sibling directory and renamed into place
(``atomic.atomic_directory``), so a reader sees either the old checkpoint or the complete new
one, never a half-written one. Loading verifies every file against ``files`` first, and refuses
a checkpoint whose map is absent or leaves a weight, state or config file out (:func:`verify`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from saescope.training.atomic import atomic_directory
from saescope.training.meta import FORMAT_VERSION, META_FILE, CheckpointError, CheckpointMeta
from saescope.training.paths import sha256_file
from saescope.training.sae import SAE, SAEConfig

WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
CFG_FILE = "cfg.json"
STATE_DIR = "training_state"
SAE_LENS_VERSION = "6.0.0"  # the cfg.json schema we write: SAELens ≥ 6
_SHA256 = re.compile(r"[0-9a-f]{64}")


# ---- writing -------------------------------------------------------------------------------------
def save_checkpoint(
    path: Path,
    sae: SAE,
    meta: CheckpointMeta,
    *,
    sparsity: Tensor | None = None,
    state_tensors: dict[str, dict[str, Tensor]] | None = None,
    state_json: dict[str, Any] | None = None,
) -> Path:
    """Write ``sae`` (already exported to model units) and ``meta`` to ``path`` atomically.

    ``meta`` must name the model and describe ``sae`` (``meta.sae == sae.cfg``); its ``files``
    and ``format_version`` are ignored and written anew. ``state_tensors`` maps file stems under
    ``training_state/`` to tensor dicts; ``state_json`` is written as ``state.json`` there.
    """
    if not meta.model or not meta.hookpoint:
        raise ValueError("meta: a checkpoint needs a model and a hookpoint")
    if meta.sae != sae.cfg:
        raise ValueError(f"meta.sae: {meta.sae} does not describe the SAE saved ({sae.cfg})")
    path = Path(path)
    with atomic_directory(path) as tmp:
        _write_contents(tmp, sae, meta, sparsity, state_tensors, state_json)
    return path


def _write_contents(
    out: Path,
    sae: SAE,
    meta: CheckpointMeta,
    sparsity: Tensor | None,
    state_tensors: dict[str, dict[str, Tensor]] | None,
    state_json: dict[str, Any] | None,
) -> None:
    weights = {k: v.detach().contiguous().cpu() for k, v in sae.state_dict().items()}
    save_file(weights, str(out / WEIGHTS_FILE))
    if sparsity is not None:
        save_file(
            {"sparsity": sparsity.detach().float().cpu().contiguous()}, str(out / SPARSITY_FILE)
        )
    _write_json(out / CFG_FILE, sae_lens_cfg(sae.cfg, meta, dtype=sae.W_enc.dtype))
    if state_tensors or state_json:
        (out / STATE_DIR).mkdir()
        for stem, tensors in (state_tensors or {}).items():
            clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
            save_file(clean, str(out / STATE_DIR / f"{stem}.safetensors"))
        _write_json(out / STATE_DIR / "state.json", state_json or {})
    files = {rel: sha256_file(out / rel) for rel in _payload_files(out)}
    full = dataclasses.replace(meta, files=files, format_version=FORMAT_VERSION)
    _write_json(out / META_FILE, full.to_json())


def sae_lens_cfg(cfg: SAEConfig, meta: CheckpointMeta, *, dtype: torch.dtype) -> dict[str, Any]:
    """The ``cfg.json`` SAELens ≥ 6 reads (``SAE.load_from_disk``)."""
    return {
        **cfg.arch.sae_lens_fields(cfg),
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": str(dtype).removeprefix("torch."),
        "device": "cpu",
        # The normalisation scale is folded into the weights on export: inputs are raw.
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAE_LENS_VERSION,
            "sae_lens_training_version": None,
            "model_name": meta.model,
            # TransformerLens's name (HookedSAETransformer attaches by it) and the module's
            "hook_name": tl_hook_name(meta.hookpoint),
            "hf_hook_name": meta.hookpoint,
            "hook_head_index": None,
            "prepend_bos": meta.prepend_bos,
            "context_size": meta.context_size,
            "dataset_path": meta.dataset,
            "trained_with": "saescope",
        },
    }


def tl_hook_name(hookpoint: str) -> str:
    """``blocks.N.hook_resid_post`` for a block output ``….N`` (else the name as it is)."""
    idx = hookpoint.rpartition(".")[2]
    return f"blocks.{idx}.hook_resid_post" if idx.isdigit() else hookpoint


# ---- reading -------------------------------------------------------------------------------------
def read_meta(path: Path) -> CheckpointMeta:
    """``saescope.json`` of a checkpoint, with a clear error if absent, unreadable or
    malformed (not verified against the files: :func:`verify`)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint: {path} is not a directory")
    try:
        meta = json.loads((path / META_FILE).read_text())
    except FileNotFoundError as e:
        if (path / "cfg.json").is_file():  # SAELens's (and sparsify's) folders start with it
            raise CheckpointError(
                f"checkpoint: {path} has a cfg.json but no {META_FILE}: a SAELens or sparsify "
                "SAE; `saescope serve` serves it as it is, but this needs a checkpoint written "
                "by `saescope train`"
            ) from e
        raise CheckpointError(f"checkpoint: {path} has no {META_FILE} (incomplete?)") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint: {path / META_FILE} is not valid JSON: {e}") from e
    return CheckpointMeta.from_json(meta, path)


def verify(path: Path, meta: CheckpointMeta | None = None) -> CheckpointMeta:
    """Check the checkpoint against the sha256 map in ``saescope.json``; return the metadata.

    The map must be complete: it must name ``sae_weights.safetensors`` and every other file a
    loader reads (``cfg.json``, every ``*.safetensors``, everything under ``training_state/``),
    and every file it names must be present with that digest. A checkpoint without the map, or
    with a file the map leaves out, is refused: an unlisted file could be corrupt unnoticed.
    """
    path = Path(path)
    meta = meta or read_meta(path)
    files = _hash_map(path, meta.files)
    unlisted = sorted(_verified_files(path) - files.keys())
    if unlisted:
        raise CheckpointError(
            f"checkpoint: {path}: {META_FILE} records no sha256 for {', '.join(unlisted)} "
            "(an incomplete hash map; the files cannot be verified)"
        )
    for rel, digest in sorted(files.items()):
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"checkpoint: {path} is missing {rel}")
        if sha256_file(f) != digest:
            raise CheckpointError(
                f"checkpoint: {f} does not match its recorded sha256 (corrupt or truncated)"
            )
    return meta


def verify_resumable(path: Path) -> CheckpointMeta:
    """:func:`verify`, and check that the checkpoint holds a training state to resume from."""
    meta = verify(path)
    if not (Path(path) / STATE_DIR / "state.json").is_file():
        raise CheckpointError(f"checkpoint: {path} has no {STATE_DIR}/ (not resumable)")
    return meta


def _hash_map(path: Path, files: dict[str, str]) -> dict[str, str]:
    """The ``files`` map, checked for shape: relative paths to hex sha256 digests."""
    if not files:
        raise CheckpointError(
            f"checkpoint: {path}: {META_FILE} has no 'files' map of sha256 digests; "
            "its weights cannot be verified (re-save it with saescope)"
        )
    for rel, digest in files.items():
        parts = Path(rel).parts  # JSON keys are strings
        if not parts or Path(rel).is_absolute() or ".." in parts:
            raise CheckpointError(f"checkpoint: {path}: {META_FILE} files: bad path {rel!r}")
        if not _SHA256.fullmatch(digest):
            raise CheckpointError(
                f"checkpoint: {path}: {META_FILE} files[{rel!r}]: not a sha256 hex digest"
            )
    return files


def _verified_files(path: Path) -> set[str]:
    """Files the hash map must cover: the weights (present or not) and whatever is loadable.

    Folders other tools write beside the SAE with hashes of their own (the feature catalog,
    its partial build and their temporary siblings: ``SIDECAR_DIRS``) are not the SAE's.
    """
    found = {WEIGHTS_FILE}
    if (path / CFG_FILE).is_file():
        found.add(CFG_FILE)
    found |= {
        str(f.relative_to(path))
        for f in path.rglob("*.safetensors")
        if f.is_file() and not _is_sidecar(f.relative_to(path))
    }
    if (path / STATE_DIR).is_dir():
        found |= {str(f.relative_to(path)) for f in (path / STATE_DIR).rglob("*") if f.is_file()}
    return found


def load_sae(
    path: Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[SAE, CheckpointMeta]:
    """Load the exported SAE and its metadata after verifying every hash.

    The SAE computes in ``dtype`` (float32 unless asked) whatever its file stores: the SAE
    shipped in the package is float16 on disk."""
    meta = verify(path)
    cfg = meta.sae
    weights = _load_tensors(Path(path) / WEIGHTS_FILE)
    # the four weights and whatever the architecture adds (a JumpReLU threshold)
    with torch.device("meta"):  # shapes only, no memory
        expected = {name: tuple(t.shape) for name, t in SAE(cfg).state_dict().items()}
    for name, shape in expected.items():
        if name not in weights or tuple(weights[name].shape) != shape:
            got = tuple(weights[name].shape) if name in weights else "absent"
            raise CheckpointError(f"checkpoint: {name} should have shape {shape}, got {got}")
    sae = SAE(cfg, dtype=dtype)
    sae.load_state_dict({k: weights[k] for k in expected})
    return sae.to(device).eval().requires_grad_(False), meta


def load_training_state(path: Path) -> tuple[dict[str, dict[str, Tensor]], dict[str, Any]]:
    """The ``training_state/`` of a (verified) checkpoint: tensor files by stem, and state.json."""
    verify_resumable(path)
    state_dir = Path(path) / STATE_DIR
    tensors = {f.stem: _load_tensors(f) for f in sorted(state_dir.glob("*.safetensors"))}
    state = json.loads((state_dir / "state.json").read_text())
    return tensors, state


def _load_tensors(f: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(f))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"checkpoint: cannot read {f}: {e}") from e


# ---- helpers -------------------------------------------------------------------------------------
SIDECAR_DIRS = ("catalog", "catalog.partial")
"""Top-level folders of a checkpoint that are not part of the SAE (each verifies itself)."""


def _is_sidecar(rel: Path) -> bool:
    top = rel.parts[0] if len(rel.parts) > 1 else ""
    return any(top == d or top.startswith(f".{d}.") for d in SIDECAR_DIRS)


def _payload_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _write_json(f: Path, obj: Any) -> None:
    f.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
