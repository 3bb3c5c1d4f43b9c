"""Evaluating an SAE on held-out text: reconstruction, sparsity, and the model's loss with the SAE
spliced in at its hookpoint.

Tokens. Held-out documents are packed into windows of ``context_size`` tokens exactly as the
trainer packs them (``saescope.training.activations``: EOS between documents, no BOS unless
``prepend_bos``), and batched with right padding (only the last window can be short). *SAE
positions* are the non-padding positions that hold no special token (BOS, EOS, …) and are not
among the first ``skip_first`` of their window (the attention sink, ``skip_first_positions``
in training). Like SAELens's evals and our trainer, the other positions are neither encoded
nor spliced: they stay clean in every pass.

Reconstruction and sparsity, over the SAE positions (N tokens, x the residual in model units,
x̂ = dec(enc(x)), f = enc(x))::

    L0            mean_t #{i : f_t,i ≠ 0}          (also its p50 and p90 over tokens)
    FVU           Σ_t ‖x_t − x̂_t‖² / Σ_t ‖x_t − x̄‖²     (centred; float64, Chan's pooled update)
    mse           mean_t ‖x_t − x̂_t‖²              (summed over d_in, averaged over tokens)
    shrinkage     Σ_t ⟨x̂_t, x_t⟩ / Σ_t ‖x_t‖²       (least-squares a in x̂ ≈ a·x; < 1 = shrunk)
    l2_ratio      mean_t ‖x̂_t‖ / ‖x_t‖
    density_i     #{t : f_t,i ≠ 0} / N;  dead = density 0 over the N evaluated tokens

Downstream loss, per predicted token (position t predicts token t+1; pairs touching padding are
excluded), with three forward passes of the whole model on the same tokens:

    clean   the model as it is
    sae     the block output at the hookpoint replaced by x̂ at the SAE positions
    zero    the block output replaced by 0 at the same SAE positions

    ce_*          mean_t −log p_*(token_{t+1})
    ce_recovered  (ce_zero − ce_sae) / (ce_zero − ce_clean)     (1 = lossless, 0 = as bad as zero)
    delta_ce      ce_sae − ce_clean
    kl            mean_t KL(p_clean ‖ p_sae) = mean_t Σ_v p_clean (log p_clean − log p_sae)  (nats)
    kl_zero       mean_t KL(p_clean ‖ p_zero)

SAELens zero-ablates every position, BOS included; we zero exactly the positions the SAE
replaces, so the two interventions differ only in what they put there and ``ce_recovered``
compares like with like. (Zeroing BOS, the attention sink, inflates ce_zero and flatters
every SAE.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saescope.training import models, positions
from saescope.training.checkpoint import load_sae
from saescope.training.sae import SAE

DEFAULT_TOKENS = 32_768
DEFAULT_CONTEXT_SIZE = 128
DEFAULT_BATCH_SIZE = 8


@dataclass(frozen=True)
class EvalMetrics:
    """The numbers of one evaluation; formulas in the module docstring."""

    l0: float
    """Mean number of active features per token."""
    l0_p50: float
    """Median of L0 over tokens."""
    l0_p90: float
    """90th percentile of L0 over tokens."""
    fvu: float
    """Fraction of variance unexplained, centred: Σ‖x−x̂‖² / Σ‖x−x̄‖²."""
    mse: float
    """Mean over tokens of ‖x−x̂‖² (summed over d_in), in model units."""
    shrinkage: float
    """Σ⟨x̂,x⟩ / Σ‖x‖²: the scale a with x̂ ≈ a·x; 1 = none, below 1 = the SAE shrinks."""
    l2_ratio: float
    """Mean over tokens of ‖x̂‖ / ‖x‖."""
    dead_fraction: float
    """Share of features never active over the ``tokens`` evaluated."""
    ce_clean: float
    """Cross-entropy (nats per predicted token) of the unmodified model."""
    ce_sae: float
    """Cross-entropy with x̂ spliced in at the hookpoint."""
    ce_zero: float
    """Cross-entropy with the residual zeroed at the hookpoint."""
    ce_recovered: float | None
    """(ce_zero − ce_sae) / (ce_zero − ce_clean); None when ce_zero = ce_clean."""
    delta_ce: float
    """ce_sae − ce_clean."""
    kl: float
    """Mean KL(clean ‖ spliced) in nats per predicted token."""
    kl_zero: float
    """Mean KL(clean ‖ zero-ablated) in nats per predicted token."""


@dataclass
class EvalResult:
    """An evaluation: its metrics, its token counts, and the distributions behind the plots."""

    metrics: EvalMetrics
    tokens: int
    """SAE positions evaluated (non-special, non-padding): the window of ``dead_fraction``."""
    model_tokens: int
    """Tokens run through the model, special ones included."""
    predicted_tokens: int
    """Next-token predictions the CE and KL average over."""
    sequences: int
    """Windows (batch rows) run through the model."""
    feature_density: Tensor = field(repr=False)
    """(d_sae,) float64: share of evaluated tokens on which each feature fires."""
    l0_per_token: Tensor = field(repr=False)
    """(tokens,) int64: active features at each evaluated token."""
    info: dict[str, Any] = field(default_factory=dict)
    """Where the numbers come from: checkpoint, model, hookpoint, SAE shape, data, context size."""


# ---- tokens ----------------------------------------------------------------------------------
def token_windows(
    texts: Iterable[str],
    tokenizer: Any,
    *,
    context_size: int,
    max_tokens: int,
    prepend_bos: bool = False,
) -> Iterator[list[int]]:
    """Windows of ``context_size`` tokens packed from ``texts``, ``max_tokens`` in all.

    Packed as the trainer packs (``activations.py``): each document tokenised with the
    tokenizer's own special tokens and followed by EOS unless the tokenizer marks document
    starts itself; with ``prepend_bos`` every window also starts with BOS. Only the last window
    may be shorter. Documents are read only as far as the budget needs.
    """
    bos = tokenizer.bos_token_id if prepend_bos else None
    body = context_size - (bos is not None)
    if body < 1:
        raise ValueError(f"context_size: must leave room for a token after BOS, got {context_size}")
    separator = _document_separator(tokenizer)
    docs = iter(texts)
    pending: list[int] = []
    budget = max_tokens
    while budget >= 2:
        while len(pending) < body and (text := next(docs, None)) is not None:
            pending += [*tokenizer(text, verbose=False)["input_ids"], *separator]
        if not pending:
            return
        window = (([bos] if bos is not None else []) + pending[:body])[:budget]
        del pending[:body]
        if len(window) >= 2:  # a window of one token predicts nothing
            budget -= len(window)
            yield window


def _document_separator(tokenizer: Any) -> list[int]:
    """``[EOS]``, or nothing when the tokenizer adds its own start-of-document token."""
    adds_own = len(tokenizer("a", verbose=False)["input_ids"]) > len(
        tokenizer("a", add_special_tokens=False, verbose=False)["input_ids"]
    )
    eos = tokenizer.eos_token_id
    return [] if adds_own or eos is None else [int(eos)]


def batches(
    windows: Iterable[list[int]], batch_size: int, pad_id: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """``(input_ids, attention_mask)``, both ``(B, T)``, right-padded to the longest window."""
    chunk: list[list[int]] = []
    for w in windows:
        chunk.append(w)
        if len(chunk) == batch_size:
            yield _pad(chunk, pad_id)
            chunk = []
    if chunk:
        yield _pad(chunk, pad_id)


def _pad(chunk: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    t = max(len(w) for w in chunk)
    ids = torch.full((len(chunk), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(chunk), t), dtype=torch.bool)
    for i, w in enumerate(chunk):
        ids[i, : len(w)] = torch.tensor(w)
        mask[i, : len(w)] = True
    return ids, mask


# ---- the evaluation --------------------------------------------------------------------------
@torch.no_grad()
def evaluate(
    model: nn.Module,
    tokenizer: Any,
    sae: SAE,
    hookpoint: str,
    texts: Iterable[str],
    *,
    context_size: int = DEFAULT_CONTEXT_SIZE,
    max_tokens: int = DEFAULT_TOKENS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    prepend_bos: bool = False,
    skip_first: int = 1,
    outlier_norm_factor: float | None = None,
    progress: Callable[[int], None] | None = None,
) -> EvalResult:
    """Evaluate ``sae`` (model units) at ``hookpoint`` of ``model`` on ``texts``.

    The first ``skip_first`` positions of every window stay clean like special ones (the
    trainer's ``skip_first_positions``: a window's first token is an attention sink whose
    residual is far off the distribution). Likewise, with ``outlier_norm_factor`` (the trainer's
    rule), positions whose residual norm exceeds that factor × the batch's median stay clean:
    the SAE never trained on them, and one such token can hold most of a batch's Σ‖x‖².
    ``progress`` gets each batch's model-token count.
    """
    hookpoint = check_fit(model, sae, hookpoint)
    device = next(model.parameters()).device
    sae = sae.to(device)
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long, device=device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    acc = _Accumulator(sae.cfg.d_sae, device)
    windows = token_windows(
        texts, tokenizer, context_size=context_size, max_tokens=max_tokens, prepend_bos=prepend_bos
    )
    for ids, attn in batches(windows, batch_size, pad_id):
        ids, attn = ids.to(device), attn.to(device)
        # (B, T) the positions the SAE reads and replaces (``positions``: the trainer's rule)
        sae_pos = positions.eligible(torch.isin(ids, special), skip_first, attn)
        _eval_batch(model, sae, hookpoint, ids, attn, sae_pos, acc, outlier_norm_factor)
        acc.count_batch(int(attn.sum()), ids.shape[0])
        if progress is not None:
            progress(int(attn.sum()))
    if acc.n_tokens == 0:
        raise ValueError(
            "data: the held-out text gave no tokens to evaluate (empty, or only special tokens)"
        )
    return acc.result()


def _eval_batch(
    model: nn.Module,
    sae: SAE,
    hookpoint: str,
    ids: Tensor,
    attn: Tensor,
    sae_pos: Tensor,
    acc: _Accumulator,
    outlier_norm_factor: float | None = None,
) -> None:
    """Clean pass (capturing x), SAE on x, spliced pass, zero-ablated pass; accumulate.

    Only one pass's logits ``(B, T, V)`` are alive at a time, beside the clean log-probs.
    """
    pred = attn[:, :-1] & attn[:, 1:]  # (B, T-1): position t predicts token t+1
    labels = ids[:, 1:][pred]  # (P,)
    with models.capture(model, [hookpoint]) as store:
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
    logp_clean = _log_probs(logits, pred)  # (P, V)
    del logits
    h = store[hookpoint]  # (B, T, d_in), model dtype
    if h.shape[-1] != sae.cfg.d_in:
        raise ValueError(
            f"d_in: the SAE reads d_in={sae.cfg.d_in} but {hookpoint} outputs width {h.shape[-1]}"
        )
    if outlier_norm_factor:
        norms = h.float().norm(dim=-1)  # (B, T)
        sae_pos = sae_pos & ~positions.norm_outliers(norms, sae_pos, outlier_norm_factor)
    x = h[sae_pos].to(sae.W_enc.dtype)  # (N, d_in)
    x_hat, f = sae(x)  # (N, d_in), (N, d_sae)
    acc.add_reconstruction(x, x_hat, f)
    acc.add_clean(logp_clean, labels)

    h_hat = h.clone()
    h_hat[sae_pos] = x_hat.to(h.dtype)
    keep = sae_pos[..., None]  # (B, T, 1)
    edits: dict[str, Callable[[Tensor], Tensor]] = {
        "sae": lambda h: torch.where(keep, h_hat, h),
        "zero": lambda h: h.masked_fill(keep, 0),
    }
    for name, edit in edits.items():
        logp = _log_probs(_run_spliced(model, hookpoint, ids, attn, edit), pred)  # (P, V)
        acc.add_intervention(name, logp_clean, logp, labels)


def _run_spliced(
    model: nn.Module, hookpoint: str, ids: Tensor, attn: Tensor, edit: Callable[[Tensor], Tensor]
) -> Tensor:
    """Logits ``(B, T, V)`` with the hooked block's output hidden state replaced by ``edit(h)``."""

    def hook(_m: nn.Module, _i: Any, out: Any) -> Any:
        return models.with_hidden(out, edit(models.hidden_of(out)))

    handle = model.get_submodule(hookpoint).register_forward_hook(hook)
    try:
        return model(input_ids=ids, attention_mask=attn, use_cache=False).logits
    finally:
        handle.remove()


def _log_probs(logits: Tensor, pred: Tensor) -> Tensor:
    """Float32 log-softmax ``(P, V)`` of the logits at the predicting positions."""
    return F.log_softmax(logits[:, :-1][pred].float(), dim=-1)


def check_fit(model: nn.Module, sae: SAE, hookpoint: str) -> str:
    """The validated hookpoint; a ValueError if it is unknown or its width is not the SAE's d_in."""
    hookpoint = models.resolve_hookpoint(model, hookpoint)
    width = getattr(getattr(model, "config", None), "hidden_size", None)
    if width is not None and width != sae.cfg.d_in:
        raise ValueError(
            f"d_in: the SAE reads d_in={sae.cfg.d_in} but the model's residual stream at "
            f"{hookpoint} has width {width}"
        )
    return hookpoint


# ---- accumulation ----------------------------------------------------------------------------
class _Accumulator:
    """Running sums over batches; the variance is pooled exactly (Chan et al. 1979) in float64."""

    def __init__(self, d_sae: int, device: torch.device) -> None:
        self.n_tokens = 0
        self.n_model_tokens = 0
        self.n_sequences = 0
        self.fired = torch.zeros(d_sae, dtype=torch.long, device=device)  # (d_sae,)
        self.l0: list[Tensor] = []  # per batch (N,)
        self.mean: Tensor | None = None  # (d_in,) float64, running x̄
        self.m2 = 0.0  # Σ‖x − x̄‖²
        self.sums = dict.fromkeys(("sse", "dot", "sq", "l2_ratio"), 0.0)
        self.n_pred = 0
        self.ce = dict.fromkeys(("clean", "sae", "zero"), 0.0)
        self.kl = dict.fromkeys(("sae", "zero"), 0.0)

    def add_reconstruction(self, x: Tensor, x_hat: Tensor, f: Tensor) -> None:
        n = x.shape[0]
        if n == 0:
            return
        x64, xh64 = x.double(), x_hat.double()  # (N, d_in)
        active = f != 0  # (N, d_sae)
        self.l0.append(active.sum(-1).cpu())
        self.fired += active.sum(0)
        self.sums["sse"] += float((x64 - xh64).pow(2).sum())
        self.sums["dot"] += float((x64 * xh64).sum())
        self.sums["sq"] += float(x64.pow(2).sum())
        self.sums["l2_ratio"] += float(
            (xh64.norm(dim=-1) / x64.norm(dim=-1).clamp_min(1e-12)).sum()
        )
        # pooled variance: M2 = M2_a + M2_b + ‖x̄_b − x̄_a‖² · n_a n_b / (n_a + n_b)
        mean_b = x64.mean(0)
        m2_b = float((x64 - mean_b).pow(2).sum())
        if self.mean is None:
            self.mean, self.m2 = mean_b, m2_b
        else:
            n_a, total = self.n_tokens, self.n_tokens + n
            delta = mean_b - self.mean
            self.m2 += m2_b + float(delta.pow(2).sum()) * n_a * n / total
            self.mean = self.mean + delta * (n / total)
        self.n_tokens += n

    def add_clean(self, logp: Tensor, labels: Tensor) -> None:
        """Clean log-probs ``(P, V)`` and the tokens they predict ``(P,)``."""
        self.ce["clean"] -= float(logp.gather(-1, labels[:, None]).double().sum())
        self.n_pred += labels.numel()

    def add_intervention(self, name: str, clean: Tensor, logp: Tensor, labels: Tensor) -> None:
        """CE and KL(clean ‖ edited) of one edited pass; log-probs ``(P, V)``."""
        self.ce[name] -= float(logp.gather(-1, labels[:, None]).double().sum())
        p = clean.exp()
        # p·(log p − log q), with 0·anything = 0 where p underflows (avoids −inf − −inf)
        kl = torch.where(p > 0, p * (clean - logp), torch.zeros_like(p)).sum(-1)  # (P,)
        self.kl[name] += float(kl.double().sum())

    def count_batch(self, model_tokens: int, sequences: int) -> None:
        self.n_model_tokens += model_tokens
        self.n_sequences += sequences

    def result(self) -> EvalResult:
        n, p = self.n_tokens, max(self.n_pred, 1)
        l0 = torch.cat(self.l0)  # (N,)
        l0_p50, l0_p90 = np.percentile(l0.numpy(), [50, 90])
        ce = {k: v / p for k, v in self.ce.items()}
        span = ce["zero"] - ce["clean"]
        metrics = EvalMetrics(
            l0=float(l0.double().mean()),
            l0_p50=float(l0_p50),
            l0_p90=float(l0_p90),
            fvu=self.sums["sse"] / self.m2 if self.m2 > 0 else math.nan,
            mse=self.sums["sse"] / n,
            shrinkage=self.sums["dot"] / self.sums["sq"] if self.sums["sq"] > 0 else math.nan,
            l2_ratio=self.sums["l2_ratio"] / n,
            dead_fraction=float((self.fired == 0).double().mean()),
            ce_clean=ce["clean"],
            ce_sae=ce["sae"],
            ce_zero=ce["zero"],
            ce_recovered=(ce["zero"] - ce["sae"]) / span if span != 0 else None,
            delta_ce=ce["sae"] - ce["clean"],
            kl=self.kl["sae"] / p,
            kl_zero=self.kl["zero"] / p,
        )
        return EvalResult(
            metrics=metrics,
            tokens=n,
            model_tokens=self.n_model_tokens,
            predicted_tokens=self.n_pred,
            sequences=self.n_sequences,
            feature_density=(self.fired.double() / n).cpu(),
            l0_per_token=l0,
        )


# ---- a checkpoint, end to end ----------------------------------------------------------------
def evaluate_checkpoint(
    path: Path,
    *,
    data: str | None = None,
    max_tokens: int = DEFAULT_TOKENS,
    context_size: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str = "auto",
    dtype: torch.dtype = torch.float32,
    progress: Callable[[int], None] | None = None,
) -> EvalResult:
    """Load a checkpoint, its model and held-out text, and :func:`evaluate` it.

    Text: without ``data``, the checkpoint's training data config with ``heldout=True``. With
    ``data`` naming the training source, the same; naming another source, all of it (none of
    it was trained on). ``context_size`` defaults to the checkpoint's.
    """
    sae, meta = load_sae(Path(path))
    if meta.model is None:
        raise ValueError(f"checkpoint {path}: records no model")
    # The trainer records the default model by its hub id; it means the cached offline copy.
    name = models.DEFAULT_MODEL if meta.model == models.DEFAULT_MODEL_NAME else meta.model
    try:
        model, tokenizer = models.load_model(name, device=device, dtype=dtype)
    except OSError as e:
        raise ValueError(f"model: cannot load {name!r}, named by checkpoint {path}: {e}") from e
    try:
        hookpoint = check_fit(model, sae, meta.hookpoint)
    except ValueError as e:
        raise ValueError(f"checkpoint {path}: {e}") from e
    data_cfg, heldout = _data_config((meta.config or {}).get("data"), data)
    context_size = context_size or meta.context_size or DEFAULT_CONTEXT_SIZE
    prepend_bos = meta.prepend_bos
    skip_first = meta.skip_first_positions
    outlier = meta.outlier_norm_factor
    from saescope.training.data import iter_texts

    result = evaluate(
        model,
        tokenizer,
        sae,
        hookpoint,
        iter_texts(data_cfg, heldout=heldout),
        context_size=context_size,
        max_tokens=max_tokens,
        batch_size=batch_size,
        prepend_bos=prepend_bos,
        skip_first=skip_first,
        outlier_norm_factor=outlier,
        progress=progress,
    )
    result.info = {
        "checkpoint": str(path),
        "model": meta.model,
        "hookpoint": hookpoint,
        "sae": sae.cfg.to_dict(),
        "tokens_seen": meta.tokens_seen,
        "data": {**_as_dict(data_cfg), "heldout": heldout},
        "context_size": context_size,
        "prepend_bos": prepend_bos,
        "skip_first_positions": skip_first,
        "outlier_norm_factor": outlier,
        "dtype": str(dtype).removeprefix("torch."),
        "special_positions": "clean (not encoded, not spliced, not zeroed); so are the first "
        "skip_first_positions of a window and residual-norm outliers",
    }
    return result


def _data_config(training: dict[str, Any] | None, source: str | None) -> tuple[Any, bool]:
    """``(DataConfig, heldout)`` for the text to evaluate on."""
    from saescope.training.data import DataConfig

    if source is None:
        if not training:
            raise ValueError("data: the checkpoint records no training data; pass --data SOURCE")
        return DataConfig(**training), True
    if training and training.get("source") == source:
        return DataConfig(**training), True
    return DataConfig(source=source), False


def _as_dict(obj: Any) -> dict[str, Any]:
    if hasattr(obj, "model_dump"):
        return dict(obj.model_dump(mode="json"))
    return asdict(obj)
