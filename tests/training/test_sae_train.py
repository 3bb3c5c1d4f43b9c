"""The hand-written training pass (``sae_train``) against autograd through ``sae.py``'s math.

Losses, statistics and every parameter gradient must agree, in float64, for relu, topk and
batchtopk, with
the buffers reused across calls; AuxK's gradients (over the dead columns only) must agree with
autograd through the dense formula.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from saescope.training.architectures import batch_topk
from saescope.training.sae import SAE, SAEConfig
from saescope.training.sae_train import Buffers, batch_top, training_pass

D_IN, D_SAE, K, N = 12, 40, 4, 33


def make_sae(architecture: str, seed: int = 0) -> SAE:
    k = K if architecture in ("topk", "batchtopk") else None
    sae = SAE(SAEConfig(D_IN, D_SAE, architecture, k))  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D_IN, D_SAE, generator=g))
        sae.b_enc.copy_(0.3 * torch.randn(D_SAE, generator=g) - 0.5)  # some features stay off
        sae.W_dec.copy_(
            torch.randn(D_SAE, D_IN, generator=g) * (0.2 + torch.rand(D_SAE, 1, generator=g))
        )
        sae.b_dec.copy_(0.5 * torch.randn(D_IN, generator=g))
    return sae.double()


def batch(seed: int) -> Tensor:
    return torch.randn(N, D_IN, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def grads(sae: SAE) -> dict[str, Tensor]:
    out = {name: p.grad.clone() for name, p in sae.named_parameters() if p.grad is not None}
    sae.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("architecture", ["relu", "topk", "batchtopk"])
def test_losses_counts_and_gradients_equal_autograd(architecture: str) -> None:
    sae, buffers, lam = make_sae(architecture), Buffers(), 0.7
    for seed in range(3):  # the same buffers every time, as in training
        x = batch(seed)
        # reference: autograd through the module's own math
        pre = sae.encode_pre(x)
        # batchtopk trains on the batch's k·N largest (its inference threshold comes later)
        f = batch_topk(pre, K) if architecture == "batchtopk" else sae.activate(pre)
        x_hat = sae.decode(f)
        mse = (x - x_hat).pow(2).sum(-1).mean()
        sparsity = sae.sparsity_penalty(f).mean()
        (mse + lam * sparsity if architecture == "relu" else mse).backward()
        want = grads(sae)

        p = training_pass(sae, x, buffers)
        (p.mse + lam * p.sparsity if architecture == "relu" else p.mse).backward()
        got = grads(sae)

        torch.testing.assert_close(p.mse, mse.detach(), rtol=1e-12, atol=0)
        torch.testing.assert_close(p.sparsity, sparsity.detach(), rtol=1e-12, atol=0)
        torch.testing.assert_close(p.x_hat, x_hat.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(p.counts, (f > 0).sum(0).double())
        assert 0 < float(p.counts.sum()) < N * D_SAE  # some active, some not: the mask matters
        assert set(got) == {"W_enc", "b_enc", "W_dec", "b_dec"}
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-12, msg=name)
    if architecture != "relu":
        assert p.pre is not None
        torch.testing.assert_close(p.pre, sae.encode_pre(x).detach())


def test_a_pass_is_not_silently_clobbered_by_the_next() -> None:
    """Two passes before one backward share the buffers: autograd refuses, nothing is wrong."""
    sae, buffers = make_sae("relu"), Buffers()
    first = training_pass(sae, batch(0), buffers)
    training_pass(sae, batch(1), buffers)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        first.mse.backward()


def test_aux_k_gradients_over_dead_columns_equal_the_dense_formula() -> None:
    sae, x = make_sae("topk"), batch(5)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[[0, 3, 7, 8, 20, 31, 39]] = True
    k_aux = 3
    x_hat = sae.decode(sae.encode(x)).detach()

    pre = sae.encode_pre(x)  # dense reference: every column, masked
    residual = x - x_hat
    top = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=-1)
    f_aux = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
    num = (residual - f_aux @ sae.W_dec).pow(2).sum(-1).mean()
    den = (residual - residual.mean(0)).pow(2).sum(-1).mean()
    (num / den).backward()
    want = grads(sae)

    got_loss = sae.aux_k_loss(x, x_hat, pre.detach(), dead, k_aux)
    got_loss.backward()
    got = grads(sae)
    torch.testing.assert_close(got_loss.detach(), (num / den).detach(), rtol=1e-12, atol=0)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-12, msg=name)
    # only the dead features' encoder columns move
    assert torch.all(got["W_enc"][:, ~dead] == 0) and torch.any(got["W_enc"][:, dead] != 0)


@pytest.mark.parametrize("crowded", [False, True])
def test_batch_top_equals_a_flat_topk(crowded: bool) -> None:
    """``batch_top`` finds exactly the flat top-m entries: from each row's candidates, or, when
    one row holds more of them than its candidates (``crowded``), by the flat search."""
    g = torch.Generator().manual_seed(3)
    pre = torch.randn(64, 200, generator=g)
    if crowded:
        pre[5] += 10.0  # row 5 holds all of the top 128: far more than its 8 candidates
    values, rows, cols = batch_top(pre, 128)
    flat = pre.reshape(-1).topk(128)
    assert sorted((rows * 200 + cols).tolist()) == sorted(flat.indices.tolist())
    torch.testing.assert_close(values, pre[rows, cols])
    assert bool((rows == 5).all()) == crowded


def test_jumprelu_pass_equals_autograd_with_the_estimators() -> None:
    """Losses, counts and every gradient, the threshold's (straight-through) included."""
    from saescope.training.architectures import JumpReLU

    sae = SAE(SAEConfig(D_IN, D_SAE, "jumprelu", options={"bandwidth": 0.5}))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D_IN, D_SAE, generator=g))
        sae.b_enc.copy_(0.3 * torch.randn(D_SAE, generator=g))
        sae.W_dec.copy_(torch.randn(D_SAE, D_IN, generator=g) * 0.3)
        sae.b_dec.copy_(0.5 * torch.randn(D_IN, generator=g))
        sae.threshold.copy_(torch.rand(D_SAE, generator=g))
    sae = sae.double()
    arch, buffers, lam = JumpReLU(), Buffers(), 0.3
    for seed in range(3):
        x = batch(seed)
        ref = arch.reference_pass(sae, x)
        (ref.mse + lam * ref.sparsity).backward()
        want = grads(sae)
        p = training_pass(sae, x, buffers)
        (p.mse + lam * p.sparsity).backward()
        got = grads(sae)
        torch.testing.assert_close(p.mse, ref.mse.detach(), rtol=1e-12, atol=0)
        torch.testing.assert_close(p.sparsity, ref.sparsity.detach(), rtol=1e-12, atol=0)
        torch.testing.assert_close(p.counts, ref.counts)
        assert set(got) == set(want) == {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}
        assert float(want["threshold"].abs().sum()) > 0  # the estimators moved it
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-12, msg=name)
