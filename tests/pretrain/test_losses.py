"""NT-Xent against a brute-force loop over anchors and against closed-form values."""

from __future__ import annotations

import math

import pytest
import torch

from twinview.pretrain.objectives.losses import (
    info_nce,
    multi_positive_nt_xent,
    nt_xent,
    pairwise_contrastive,
    supcon,
    triplet,
)


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


# ---- InfoNCE, SupCon, margin contrastive, triplet: brute-force loops over pairs and triplets ----


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def _assert_same_value_and_grad(fast: torch.Tensor, slow: torch.Tensor, inputs: list[torch.Tensor]) -> None:
    assert fast.item() == pytest.approx(slow.item(), rel=1e-5, abs=1e-7)
    for g_fast, g_slow in zip(torch.autograd.grad(fast, inputs), torch.autograd.grad(slow, inputs), strict=True):
        torch.testing.assert_close(g_fast, g_slow, rtol=1e-4, atol=1e-6)


def info_nce_loop(q: torch.Tensor, k: torch.Tensor, bank: torch.Tensor, t: float) -> torch.Tensor:
    q, k, bank = _unit(q), _unit(k), _unit(bank.detach())
    total = torch.zeros((), dtype=torch.float64)
    for i in range(len(q)):
        pos = torch.exp(q[i] @ k[i] / t)
        negs = sum(torch.exp(q[i] @ bank[j] / t) for j in range(len(bank)))
        total = total - torch.log(pos / (pos + negs))
    return total / len(q)


@pytest.mark.parametrize("t", [0.07, 0.2, 1.0])
def test_info_nce_matches_loop_and_sends_no_gradient_to_the_bank(t: float) -> None:
    q, k, bank = _rand(5, 4, seed=1), _rand(5, 4, seed=2), _rand(7, 4, seed=3)
    _assert_same_value_and_grad(info_nce(q, k, bank, t), info_nce_loop(q, k, bank, t), [q, k])
    info_nce(q, k, bank, t).backward()
    assert bank.grad is None


def test_info_nce_hand_computed() -> None:
    # q = k, one orthogonal negative: l = -log(e^{1/t} / (e^{1/t} + e^0)) = log(1 + e^{-1/t}).
    q = torch.tensor([[1.0, 0.0]])
    assert info_nce(q, q, torch.tensor([[0.0, 2.0]]), 0.5).item() == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-6)


def supcon_loop(z: torch.Tensor, labels: list[int], t: float) -> torch.Tensor:
    z = _unit(z)
    terms = []
    for i in range(len(z)):
        positives = [p for p in range(len(z)) if p != i and labels[p] == labels[i]]
        if not positives:
            continue
        denominator = sum(torch.exp(z[i] @ z[a] / t) for a in range(len(z)) if a != i)
        terms.append(-sum(torch.log(torch.exp(z[i] @ z[p] / t) / denominator) for p in positives) / len(positives))
    return torch.stack(terms).mean()


@pytest.mark.parametrize("t", [0.1, 0.5])
def test_supcon_matches_loop(t: float) -> None:
    z = _rand(9, 5, seed=4)
    labels = [0, 1, 0, 2, 1, 0, 3, 2, 1]  # class 3 has one sample: an anchor without positives
    _assert_same_value_and_grad(supcon(z, torch.tensor(labels), t), supcon_loop(z, labels, t), [z])


@pytest.mark.parametrize("t", [0.1, 0.3])
def test_supcon_with_every_image_its_own_class_is_nt_xent(t: float) -> None:
    a, b = _rand(6, 4, seed=5), _rand(6, 4, seed=6)
    labels = torch.arange(6).repeat(2)
    assert supcon(torch.cat([a, b]), labels, t).item() == pytest.approx(nt_xent(a, b, t).item(), rel=1e-5)


def contrastive_loop(z1: torch.Tensor, z2: torch.Tensor, y: list[int], m: float) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64)
    for i in range(len(z1)):
        d = (z1[i] - z2[i]).norm()
        total = total + ((1 - y[i]) * 0.5 * d**2 + y[i] * 0.5 * torch.clamp(m - d, min=0) ** 2)
    return total / len(z1)


@pytest.mark.parametrize("m", [0.5, 2.0, 5.0])
def test_pairwise_contrastive_matches_loop(m: float) -> None:
    z1, z2 = _rand(8, 3, seed=7), _rand(8, 3, seed=8)
    y = [0, 1, 1, 0, 1, 0, 0, 1]
    _assert_same_value_and_grad(
        pairwise_contrastive(z1, z2, torch.tensor(y), m), contrastive_loop(z1, z2, y, m), [z1, z2]
    )


def test_pairwise_contrastive_hand_computed() -> None:
    z1 = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    z2 = torch.tensor([[3.0, 4.0], [0.6, 0.8]])  # distances 5 and 1
    # similar pair at D=5: 1/2 * 25; dissimilar pair at D=1 with m=2: 1/2 * (2-1)^2; mean of the two
    assert pairwise_contrastive(z1, z2, torch.tensor([0, 1]), 2.0).item() == pytest.approx((12.5 + 0.5) / 2)


def triplet_loop(z: torch.Tensor, labels: list[int], m: float, mining: str) -> torch.Tensor:
    n = len(z)
    d = [[(z[i] - z[j]).norm() for j in range(n)] for i in range(n)]

    def pos(a: int) -> list[int]:
        return [p for p in range(n) if p != a and labels[p] == labels[a]]

    def neg(a: int) -> list[int]:
        return [x for x in range(n) if labels[x] != labels[a]]

    terms = []
    for a in range(n):
        if mining == "batch_all":
            for p in pos(a):
                for x in neg(a):
                    value = torch.clamp(d[a][p] - d[a][x] + m, min=0)
                    if value.item() > 0:
                        terms.append(value)
        elif mining == "batch_hard":
            if pos(a) and neg(a):
                hp = max((d[a][p] for p in pos(a)), key=lambda v: v.item())
                hn = min((d[a][x] for x in neg(a)), key=lambda v: v.item())
                terms.append(torch.clamp(hp - hn + m, min=0))
        else:
            for p in pos(a):
                if not neg(a):
                    continue
                farther = [d[a][x] for x in neg(a) if d[a][x].item() > d[a][p].item()]
                chosen = (
                    min(farther, key=lambda v: v.item())
                    if farther
                    else max((d[a][x] for x in neg(a)), key=lambda v: v.item())
                )
                terms.append(torch.clamp(d[a][p] - chosen + m, min=0))
    return torch.stack(terms).mean() if terms else z.sum() * 0


@pytest.mark.parametrize("mining", ["batch_all", "batch_hard", "semi_hard"])
@pytest.mark.parametrize("m", [0.1, 0.5, 2.0])
def test_triplet_matches_loop(mining: str, m: float) -> None:
    z = _rand(10, 4, seed=9)
    labels = [0, 0, 1, 1, 1, 2, 2, 0, 3, 2]  # class 3: an anchor without positives
    _assert_same_value_and_grad(triplet(z, torch.tensor(labels), m, mining), triplet_loop(z, labels, m, mining), [z])


def test_triplet_hand_computed_and_no_valid_triplets() -> None:
    z = torch.tensor([[0.0], [1.0], [3.0]])  # a=0, p=1 (label 0), n=3 (label 1)
    labels = torch.tensor([0, 0, 1])
    # batch_hard anchors: 0: d_ap 1, d_an 3 -> max(0, 1-3+2.5)=0.5; 1: d_ap 1, d_an 2 -> 1.5; 2 has no positive
    assert triplet(z, labels, 2.5, "batch_hard").item() == pytest.approx(1.0)
    assert triplet(z, torch.tensor([0, 1, 2]), 1.0, "batch_all").item() == 0.0
    with pytest.raises(ValueError, match="batch_hard"):
        triplet(z, labels, 1.0, "hardest")


def multi_positive_loop(views: list[torch.Tensor], t: float) -> torch.Tensor:
    """Multi-crop NT-Xent written out anchor by anchor: every other view of the same image is a
    positive, the mean of -log softmax over them; all other views are in the denominator."""
    v, n = len(views), views[0].shape[0]
    z = torch.cat(views).double()
    z = z / z.norm(dim=1, keepdim=True)
    image = [i % n for i in range(v * n)]
    total = torch.zeros((), dtype=torch.float64)
    for i in range(v * n):
        denominator = sum(torch.exp(z[i] @ z[k] / t) for k in range(v * n) if k != i)
        positives = [p for p in range(v * n) if p != i and image[p] == image[i]]
        total = total - sum(torch.log(torch.exp(z[i] @ z[p] / t) / denominator) for p in positives) / len(positives)
    return total / (v * n)


@pytest.mark.parametrize("views", [3, 5])
def test_multi_positive_nt_xent_matches_loop_and_is_nt_xent_for_two_views(views: int) -> None:
    g = torch.Generator().manual_seed(views)
    zs = [torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(views)]
    fast, slow = multi_positive_nt_xent(zs, 0.3), multi_positive_loop(zs, 0.3)
    assert fast.item() == pytest.approx(slow.item(), rel=1e-5)
    for got, want in zip(torch.autograd.grad(fast, zs), torch.autograd.grad(slow, zs), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    a, b = zs[0].detach(), zs[1].detach()
    assert multi_positive_nt_xent([a, b], 0.3).item() == pytest.approx(nt_xent(a, b, 0.3).item(), rel=1e-5)
