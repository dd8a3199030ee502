"""NT-Xent against a brute-force loop over anchors and against closed-form values."""

from __future__ import annotations

import math

import pytest
import torch

from twinview.pretrain.losses import nt_xent


def nt_xent_loop(z_a: torch.Tensor, z_b: torch.Tensor, t: float) -> torch.Tensor:
    """The SimCLR loss written out anchor by anchor, straight from the paper's definition."""
    z = torch.cat([z_a, z_b]).double()
    z = z / z.norm(dim=1, keepdim=True)
    n2 = z.shape[0]
    n = n2 // 2
    total = torch.zeros((), dtype=torch.float64)
    for i in range(n2):
        positive = (i + n) % n2
        numerator = torch.exp(z[i] @ z[positive] / t)
        denominator = sum(torch.exp(z[i] @ z[k] / t) for k in range(n2) if k != i)
        total = total - torch.log(numerator / denominator)
    return total / n2


@pytest.mark.parametrize("t", [0.07, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("n,d", [(2, 3), (5, 8), (16, 4)])
def test_matches_brute_force_value_and_gradient(n: int, d: int, t: float) -> None:
    g = torch.Generator().manual_seed(n * 100 + d)
    a = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    fast = nt_xent(a, b, t)
    slow = nt_xent_loop(a, b, t)
    assert fast.item() == pytest.approx(slow.item(), rel=1e-5)
    ga, gb = torch.autograd.grad(fast, [a, b])
    ra, rb = torch.autograd.grad(slow, [a, b])
    torch.testing.assert_close(ga, ra, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gb, rb, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("t", [0.1, 0.5])
@pytest.mark.parametrize("n", [2, 4, 8])
def test_identical_orthogonal_views_have_closed_form(n: int, t: float) -> None:
    # Identical views of mutually orthogonal unit vectors: positive similarity 1, every one of the
    # 2N-2 negatives has similarity 0, so l_i = log(1 + (2N - 2) exp(-1/t)) for every anchor.
    z = torch.eye(n, 2 * n) * 3.0  # the scale must not matter: the loss normalises
    expected = math.log(1 + (2 * n - 2) * math.exp(-1 / t))
    assert nt_xent(z, z.clone(), t).item() == pytest.approx(expected, rel=1e-5, abs=1e-7)  # float32


def test_collapsed_embeddings_give_log_of_negatives() -> None:
    # All 2N embeddings equal: every logit is 1/t, so the loss is log(2N - 1) whatever t is.
    z = torch.ones(6, 4)
    assert nt_xent(z, z, 0.3).item() == pytest.approx(math.log(11), rel=1e-5)


def test_swapping_views_keeps_the_loss() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    assert nt_xent(a, b, 0.2).item() == pytest.approx(nt_xent(b, a, 0.2).item(), rel=1e-6)
