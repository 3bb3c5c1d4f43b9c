"""Third-party SAEs as they are: SAELens and sparsify folders read into our :class:`SAE`.

DESIGN §4: the SAE contract knows how to read other libraries' configs. A folder is

- **SAELens** (``cfg.json`` + ``sae_weights.safetensors``): inference architectures
  ``standard``, ``jumprelu`` (also how SAELens saves its BatchTopK and Matryoshka SAEs) and
  ``topk``; ``apply_b_dec_to_input``; ``normalize_activations`` ``none``, or
  ``expected_average_only_in`` with its scale in the cfg; a TransformerLens hook name.
- **sparsify** (``cfg.json`` + ``sae.safetensors``): a TopK ``SparseCoder``; its hookpoint is
  the folder's name (sparsify saves each hookpoint's coder under ``<run>/<hookpoint>/``).

What cannot be served exactly is refused with the field that says so (gated SAEs, per-token
normalisation, attention-head and ``hook_z`` SAEs, sparsify's groupmax, skip connections and
transcoders).

Conventions. The library computes, on ``x_n = s · x`` (``s`` = 1 unless the cfg gives a
normalisation scale)::

    pre = (x_n − a · b_dec) W_enc + b_enc     (a = apply_b_dec_to_input; sparsify: a = 1)
    f   = act(pre)                            x̂ = (f W_dec + b_dec) / s

We rewrite it in model units for the registry architecture (which subtracts ``b_dec`` or not,
``σ``): ``W_enc' = s W_enc``, ``b_dec' = b_dec / s``, ``W_dec' = W_dec / s`` and
``b_enc' = b_enc + (σ − a) · b_dec W_enc`` — the same function. Then, as ``SAE.export`` does,
the decoder norms ``n_i = ‖W_dec',i‖`` are folded into the encoder (``W_enc · n``, ``b_enc · n``,
``threshold · n``) so rows are unit and the served feature is ``f_i · n_i``, the paper's
convention. That is exact for ReLU and JumpReLU (positively homogeneous per feature) and for TopK
when SAELens selected on ``pre · n`` (``rescale_acts_by_decoder_norm``: its own features are
then already ``f_i · n_i``, its decode divides by ``n_i``) or every ``n_i`` is equal. A TopK
SAE with unequal norms that selected on raw ``pre`` would choose other features after folding,
so it is served unfolded: features exactly as the library computes them, decoder rows as saved
(``meta.feature_units`` = ``"library"``; ``"decoder_norm"`` otherwise).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from saescope.training import models
from saescope.training.meta import CheckpointMeta, FeatureUnits, Origin
from saescope.training.sae import SAE, SAEConfig

CFG_FILE = "cfg.json"
SAE_LENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"
META_FILE = "saescope.json"
_TL_RESID = re.compile(r"blocks\.(\d+)\.hook_resid_(pre|post)")


class ForeignSaeError(ValueError):
    """A third-party SAE folder that is malformed or cannot be served exactly."""


def origin_of(path: Path) -> Origin | None:
    """Which library wrote the folder ``path``; ``None`` if it is no SAE folder we know."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return "saescope"
    if not (path / CFG_FILE).is_file():
        return None
    if (path / SAE_LENS_WEIGHTS).is_file():
        return "saelens"
    if (path / SPARSIFY_WEIGHTS).is_file():
        return "sparsify"
    return None


def load_foreign(path: Path, *, device: str | torch.device = "cpu") -> tuple[SAE, CheckpointMeta]:
    """A SAELens or sparsify folder as a float32 :class:`SAE` in model units, and its metadata.

    The metadata has the folder's ``origin``, its ``hookpoint`` as the folder names it (map it
    with :func:`map_hookpoint`), ``model`` (``None`` if unrecorded), ``feature_units``, and
    what else the cfg records (SAELens: ``context_size``, ``prepend_bos``, ``dataset``).
    """
    path = Path(path)
    origin = origin_of(path)
    if origin == "saelens":
        sae, meta = _load_sae_lens(path)
    elif origin == "sparsify":
        sae, meta = _load_sparsify(path)
    else:
        raise ForeignSaeError(
            f"checkpoint: {path} is not a SAELens ({CFG_FILE} + {SAE_LENS_WEIGHTS}) or "
            f"sparsify ({CFG_FILE} + {SPARSIFY_WEIGHTS}) folder"
        )
    return sae.to(device).eval().requires_grad_(False), meta


# ---- SAELens -------------------------------------------------------------------------------------
def _load_sae_lens(path: Path) -> tuple[SAE, CheckpointMeta]:
    cfg = _read_cfg(path)
    found = cfg.get("metadata")
    meta: dict[str, Any] = found if isinstance(found, dict) else {}
    where = f"{path / CFG_FILE}"

    def field(name: str, default: Any = None) -> Any:
        """A cfg field, at the top (SAELens ≥ 6) or in ``metadata`` (or the other way)."""
        return cfg.get(name, meta.get(name, default))

    arch = str(cfg.get("architecture", "standard"))
    if arch not in ("standard", "jumprelu", "topk"):
        raise ForeignSaeError(
            f"{where}: architecture {arch!r} cannot be served; saescope serves SAELens's "
            "standard, jumprelu (also its saved batchtopk and matryoshka_batchtopk) and topk"
        )
    hook = field("hook_name")
    if not isinstance(hook, str) or not hook:
        raise ForeignSaeError(f"{where}: hook_name: the cfg records no hook name, got {hook!r}")
    if field("hook_head_index") is not None:
        raise ForeignSaeError(f"{where}: hook_head_index: attention-head SAEs cannot be served")
    if field("reshape_activations", "none") != "none":
        raise ForeignSaeError(
            f"{where}: reshape_activations: must be 'none' (hook_z SAEs cannot be served)"
        )
    scale = _input_scale(cfg, where)
    weights = _read_weights(path / SAE_LENS_WEIGHTS)
    if "log_threshold" in weights:  # older JumpReLU checkpoints (as SAELens converts them)
        weights["threshold"] = weights.pop("log_threshold").exp()
    d_in, d_sae = _dims(cfg, where)
    names = ["W_enc", "b_enc", "W_dec", "b_dec"] + (["threshold"] if arch == "jumprelu" else [])
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    w = _checked(weights, {n: shapes.get(n, (d_sae,)) for n in names}, path / SAE_LENS_WEIGHTS)
    k: int | None = None
    rescaled = False
    if arch == "topk":
        k = _positive_int(cfg.get("k"), f"{where}: k", d_sae)
        rescaled = bool(cfg.get("rescale_acts_by_decoder_norm", False))
    ours = {"standard": "relu", "jumprelu": "jumprelu", "topk": "topk"}[arch]
    sae, units = _build(
        SAEConfig(d_in=d_in, d_sae=d_sae, architecture=ours, k=k),
        w,
        applies_b_dec=bool(cfg.get("apply_b_dec_to_input", True)),
        scale=scale,
        selection_rescaled=rescaled,
    )
    context_size, prepend_bos = field("context_size"), field("prepend_bos")
    return sae, CheckpointMeta(
        model=_text(field("model_name")),
        hookpoint=hook,
        sae=sae.cfg,
        dataset=_text(field("dataset_path")),
        context_size=context_size if type(context_size) is int else None,
        prepend_bos=prepend_bos if isinstance(prepend_bos, bool) else True,  # SAELens's default
        origin="saelens",
        feature_units=units,
    )


def _input_scale(cfg: dict[str, Any], where: str) -> float:
    """``s`` of ``x_n = s · x``: 1, or the ``expected_average_only_in`` scale the cfg records."""
    mode = cfg.get("normalize_activations", "none") or "none"
    if mode == "none":
        return 1.0
    if mode != "expected_average_only_in":
        raise ForeignSaeError(
            f"{where}: normalize_activations {mode!r} rescales each token by its own norm or "
            "statistics, which no fixed SAE reproduces; saescope serves 'none' and "
            "'expected_average_only_in' (with its scale in the cfg)"
        )
    scale = cfg.get("norm_scaling_factor")
    avg = cfg.get("dataset_average_activation_norm")
    if scale is None and isinstance(avg, dict) and avg.get("in"):
        scale = float(cfg["d_in"]) ** 0.5 / float(avg["in"])  # SAELens: √d_in / E‖x‖
    if not isinstance(scale, int | float) or not scale > 0:
        raise ForeignSaeError(
            f"{where}: normalize_activations 'expected_average_only_in' needs its scale, but "
            "the cfg has neither norm_scaling_factor nor dataset_average_activation_norm.in "
            "(fold it into the weights with SAELens's fold_activation_norm_scaling_factor and "
            "set normalize_activations to 'none')"
        )
    return float(scale)


# ---- sparsify ------------------------------------------------------------------------------------
def _load_sparsify(path: Path) -> tuple[SAE, CheckpointMeta]:
    cfg = _read_cfg(path)
    where = f"{path / CFG_FILE}"
    if cfg.get("activation", "topk") != "topk":
        raise ForeignSaeError(
            f"{where}: activation {cfg.get('activation')!r} cannot be served (only 'topk')"
        )
    for flag, what in (("skip_connection", "a skip connection"), ("transcode", "a transcoder")):
        if cfg.get(flag):
            raise ForeignSaeError(f"{where}: {flag}: {what} cannot be served as an SAE")
    if not isinstance(cfg.get("d_in"), int):
        raise ForeignSaeError(f"{where}: d_in: missing or not an integer")
    d_in = int(cfg["d_in"])
    latents, factor = cfg.get("num_latents") or 0, cfg.get("expansion_factor", 32)
    if not isinstance(latents, int) or not isinstance(factor, int) or (latents or factor) < 1:
        raise ForeignSaeError(f"{where}: num_latents / expansion_factor: not positive integers")
    d_sae = latents or d_in * factor
    k = _positive_int(cfg.get("k", 32), f"{where}: k", d_sae)
    raw = _read_weights(path / SPARSIFY_WEIGHTS)
    shapes = {
        "encoder.weight": (d_sae, d_in),
        "encoder.bias": (d_sae,),
        "W_dec": (d_sae, d_in),
        "b_dec": (d_in,),
    }
    w = _checked(raw, shapes, path / SPARSIFY_WEIGHTS)
    weights = {
        "W_enc": w["encoder.weight"].T,
        "b_enc": w["encoder.bias"],
        "W_dec": w["W_dec"],
        "b_dec": w["b_dec"],
    }
    # sparsify: top-k of ReLU(pre), the same features as ReLU of the top-k of pre
    sae, units = _build(
        SAEConfig(d_in=d_in, d_sae=d_sae, architecture="topk", k=k),
        weights,
        applies_b_dec=True,
        scale=1.0,
        selection_rescaled=False,
    )
    meta = CheckpointMeta(
        model=None,
        hookpoint=path.resolve().name,
        sae=sae.cfg,
        origin="sparsify",
        feature_units=units,
    )
    return sae, meta


# ---- the rewrite into model units ----------------------------------------------------------------
@torch.no_grad()
def _build(
    cfg: SAEConfig,
    w: dict[str, Tensor],
    *,
    applies_b_dec: bool,
    scale: float,
    selection_rescaled: bool,
) -> tuple[SAE, FeatureUnits]:
    """The library's SAE as our ``cfg``'s architecture (module docstring), in float64 first."""
    W_enc, b_enc = w["W_enc"].double(), w["b_enc"].double()  # (d_in, d_sae), (d_sae,)
    W_dec, b_dec = w["W_dec"].double(), w["b_dec"].double()  # (d_sae, d_in), (d_in,)
    a = 1.0 if applies_b_dec else 0.0
    sigma = 1.0 if cfg.arch.subtract_b_dec else 0.0
    b_enc = b_enc + (sigma - a) * (b_dec @ W_enc)
    W_enc, W_dec, b_dec = W_enc * scale, W_dec / scale, b_dec / scale
    threshold = w["threshold"].double() if "threshold" in w else None
    norms = W_dec.norm(dim=1).clamp_min(1e-12)  # (d_sae,)
    equal = bool(torch.allclose(norms, norms[0].expand_as(norms), rtol=1e-6, atol=0))
    fold = cfg.architecture != "topk" or selection_rescaled or equal
    if fold:
        W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms[:, None]
        threshold = threshold * norms if threshold is not None else None
    sae = SAE(cfg, dtype=torch.float32)
    state = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    if "threshold" in cfg.arch.extra:
        if threshold is None:
            raise ForeignSaeError(f"threshold: the {cfg.architecture} SAE needs one")
        state["threshold"] = threshold
    sae.load_state_dict({n: t.float().contiguous() for n, t in state.items()})
    return sae, "decoder_norm" if fold else "library"


# ---- hook names ----------------------------------------------------------------------------------
def map_hookpoint(model: nn.Module, name: object) -> str:
    """The block of ``model`` whose output a foreign hook name reads, or a ValueError naming it.

    Accepts TransformerLens names (``blocks.N.hook_resid_post`` → block N's output,
    ``blocks.N.hook_resid_pre`` → block N−1's output), the model's own block names
    (``model.layers.N``), and a tail of them (sparsify's ``layers.N``).
    """
    if not isinstance(name, str) or not name:
        raise ValueError("hookpoint: the SAE's cfg records no hook name (hook_name)")
    prefix, blocks = models.block_list(model)
    m = _TL_RESID.fullmatch(name)
    if m:
        layer = int(m.group(1)) - (m.group(2) == "pre")
        if layer < 0:
            raise ValueError(
                f"hookpoint: {name!r} reads the embeddings, which saescope does not serve "
                "(only block outputs)"
            )
    else:
        head, _, idx = name.rpartition(".")
        if not idx.isdigit() or not (prefix == head or prefix.endswith("." + head)):
            raise ValueError(
                f"hookpoint: {name!r} is not a residual-stream hook saescope can map "
                f"(blocks.N.hook_resid_post, blocks.N.hook_resid_pre, {prefix}.N)"
            )
        layer = int(idx)
    if layer >= len(blocks):
        raise ValueError(
            f"hookpoint: {name!r} names block {layer}, but the model has {len(blocks)} blocks"
        )
    return f"{prefix}.{layer}"


def same_model(recorded: object, served: str) -> bool:
    """Whether a recorded model id plausibly names the served model (last path part, any case)."""
    if not isinstance(recorded, str) or not recorded:
        return True

    def tail(s: str) -> str:
        return s.rstrip("/").rsplit("/", 1)[-1].lower()

    return tail(recorded) == tail(served)


# ---- helpers -------------------------------------------------------------------------------------
def _read_cfg(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((path / CFG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ForeignSaeError(f"checkpoint: cannot read {path / CFG_FILE}: {e}") from e
    if not isinstance(cfg, dict):
        raise ForeignSaeError(f"checkpoint: {path / CFG_FILE} is not a JSON object")
    return cfg


def _text(v: object) -> str | None:
    """A recorded string (``None`` if absent, empty or not a string)."""
    return v if isinstance(v, str) and v else None


def _read_weights(f: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(f))
    except (SafetensorError, OSError) as e:
        raise ForeignSaeError(f"checkpoint: cannot read {f}: {e}") from e


def _dims(cfg: dict[str, Any], where: str) -> tuple[int, int]:
    d_in, d_sae = cfg.get("d_in"), cfg.get("d_sae")
    if not isinstance(d_in, int) or not isinstance(d_sae, int) or d_in < 1 or d_sae < 1:
        raise ForeignSaeError(f"{where}: d_in and d_sae must be positive integers")
    return d_in, d_sae


def _positive_int(v: object, what: str, limit: int) -> int:
    if not isinstance(v, int) or not 1 <= v <= limit:
        raise ForeignSaeError(f"{what}: must be an integer in 1…{limit}, got {v!r}")
    return v


def _checked(
    weights: dict[str, Tensor], shapes: dict[str, tuple[int, ...]], f: Path
) -> dict[str, Tensor]:
    for name, shape in shapes.items():
        got = tuple(weights[name].shape) if name in weights else "absent"
        if got != shape:
            raise ForeignSaeError(f"checkpoint: {f}: {name} should have shape {shape}, got {got}")
    return {name: weights[name] for name in shapes}
