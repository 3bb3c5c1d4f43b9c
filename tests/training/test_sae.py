"""The SAE's math (``saescope.training.sae``) against naive reference implementations.

Every reference is written with explicit loops or formulas in float64, independent of the
vectorised code: encode, decode, the decoder-norm-weighted L1, AuxK, the decoder-gradient
projection, and the export that folds the normalisation scale and the decoder norms.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from saescope.training.sae import SAE, SAEConfig

D_IN, D_SAE, K = 6, 10, 3


def make_sae(architecture: str, seed: int = 0) -> SAE:
    """Random weights with unequal decoder norms and non-zero biases."""
    sae = SAE(SAEConfig(D_IN, D_SAE, architecture, K if architecture == "topk" else None))  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D_IN, D_SAE, generator=g))
        sae.b_enc.copy_(0.3 * torch.randn(D_SAE, generator=g))
        sae.W_dec.copy_(
            torch.randn(D_SAE, D_IN, generator=g) * torch.rand(D_SAE, 1, generator=g) * 2
        )
        sae.b_dec.copy_(0.5 * torch.randn(D_IN, generator=g))
    return sae.double().requires_grad_(False)  # the references read weights as floats


def inputs(n: int = 5, seed: int = 1) -> Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---- naive references ---------------------------------------------------------------------------
def ref_pre(sae: SAE, x: Tensor) -> list[list[float]]:
    topk = sae.cfg.architecture == "topk"
    out = []
    for row in x.tolist():
        if topk:  # Gao et al. subtract b_dec before encoding
            row = [v - float(sae.b_dec[i]) for i, v in enumerate(row)]
        out.append(
            [
                sum(row[i] * float(sae.W_enc[i, j]) for i in range(D_IN)) + float(sae.b_enc[j])
                for j in range(D_SAE)
            ]
        )
    return out


def ref_encode(sae: SAE, x: Tensor) -> list[list[float]]:
    out = []
    for pre in ref_pre(sae, x):
        if sae.cfg.architecture == "topk":
            top = sorted(range(D_SAE), key=lambda j: pre[j], reverse=True)[:K]
            out.append([max(pre[j], 0.0) if j in top else 0.0 for j in range(D_SAE)])
        else:
            out.append([max(p, 0.0) for p in pre])
    return out


def ref_decode(sae: SAE, f: list[list[float]]) -> list[list[float]]:
    return [
        [
            sum(fr[j] * float(sae.W_dec[j, i]) for j in range(D_SAE)) + float(sae.b_dec[i])
            for i in range(D_IN)
        ]
        for fr in f
    ]


def ref_norms(sae: SAE) -> list[float]:
    return [math.sqrt(sum(float(sae.W_dec[j, i]) ** 2 for i in range(D_IN))) for j in range(D_SAE)]


def close(a: Tensor, b: list[list[float]] | list[float], tol: float = 1e-9) -> bool:
    return torch.allclose(a, torch.tensor(b, dtype=torch.float64), atol=tol, rtol=tol)


# ---- tests -------------------------------------------------------------------------------------
@pytest.mark.parametrize("architecture", ["relu", "topk"])
def test_encode_decode_match_the_reference(architecture: str) -> None:
    sae, x = make_sae(architecture), inputs()
    f = sae.encode(x)
    assert close(f, ref_encode(sae, x))
    assert close(sae.decode(f), ref_decode(sae, f.tolist()))
    x_hat, f2 = sae(x)
    assert torch.equal(f, f2) and close(x_hat, ref_decode(sae, ref_encode(sae, x)))
    if architecture == "topk":
        assert ((f > 0).sum(-1) <= K).all()


def test_sparsity_penalty_is_the_decoder_norm_weighted_l1() -> None:
    sae, x = make_sae("relu"), inputs()
    f = sae.encode(x)
    norms = ref_norms(sae)
    expected = [sum(fr[j] * norms[j] for j in range(D_SAE)) for fr in f.tolist()]
    assert close(sae.sparsity_penalty(f), expected)


def test_aux_k_reconstructs_the_residual_from_dead_features() -> None:
    sae, x = make_sae("topk"), inputs(8)
    pre = sae.encode_pre(x)
    f = sae.activate(pre)
    x_hat = sae.decode(f)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[[1, 4, 5, 8]] = True
    k_aux = 2
    e = (x - x_hat).tolist()
    num = den = 0.0
    mean_e = [sum(r[i] for r in e) / len(e) for i in range(D_IN)]
    for n, row in enumerate(pre.tolist()):
        top = sorted([j for j in range(D_SAE) if dead[j]], key=lambda j: row[j], reverse=True)[
            :k_aux
        ]
        e_hat = [sum(max(row[j], 0.0) * float(sae.W_dec[j, i]) for j in top) for i in range(D_IN)]
        num += sum((e[n][i] - e_hat[i]) ** 2 for i in range(D_IN))
        den += sum((e[n][i] - mean_e[i]) ** 2 for i in range(D_IN))
    got = sae.aux_k_loss(x, x_hat, pre, dead, k_aux)
    assert math.isclose(float(got), num / den, rel_tol=1e-9)
    # k_aux larger than the dead count uses them all; nothing dead gives 0
    assert torch.isfinite(sae.aux_k_loss(x, x_hat, pre, dead, 100))
    assert float(sae.aux_k_loss(x, x_hat, pre, torch.zeros_like(dead), k_aux)) == 0.0


@pytest.mark.parametrize("architecture", ["relu", "topk"])
def test_export_folds_scale_and_decoder_norms_exactly(architecture: str) -> None:
    sae, x = make_sae(architecture), inputs(7) * 40.0  # model units
    if architecture == "topk":
        sae.normalize_decoder()  # topk trains with unit-norm rows
    scale = 0.025
    out = sae.export(scale)
    f_norm = sae.encode(x * scale)  # what the trained SAE sees
    norms = torch.tensor(ref_norms(sae), dtype=torch.float64)
    # served features are f_i · ‖W_dec,i‖ in model units (÷ scale); unit-norm directions;
    # the reconstruction is in model units (DESIGN §4: served activations are in model units)
    assert torch.allclose(out.encode(x), f_norm * norms / scale, atol=1e-9)
    assert torch.allclose(out.decode(out.encode(x)), sae.decode(f_norm) / scale, atol=1e-9)
    assert torch.allclose(out.W_dec.norm(dim=1), torch.ones(D_SAE, dtype=torch.float64))


def test_init_weights_ties_encoder_to_decoder() -> None:
    for architecture, norm in (("relu", 0.1), ("topk", 1.0)):
        sae = make_sae(architecture)
        sae.init_weights(torch.Generator().manual_seed(0))
        assert torch.equal(sae.W_enc, sae.W_dec.T)
        assert torch.allclose(
            sae.W_dec.norm(dim=1), torch.full((D_SAE,), norm, dtype=torch.float64)
        )
        assert not sae.b_enc.any() and not sae.b_dec.any()


def test_remove_parallel_grad_leaves_only_the_tangent_part() -> None:
    sae = make_sae("topk")
    sae.W_dec.grad = torch.randn(D_SAE, D_IN, dtype=torch.float64)
    before = sae.W_dec.grad.clone()
    sae.remove_parallel_grad()
    for j in range(D_SAE):
        w = sae.W_dec[j] / sae.W_dec[j].norm()
        assert abs(float(sae.W_dec.grad[j] @ w)) < 1e-12
        # only the component along w was removed
        assert torch.allclose(before[j] - sae.W_dec.grad[j], (before[j] @ w) * w)
    sae.normalize_decoder()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(D_SAE, dtype=torch.float64))
