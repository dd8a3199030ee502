"""NT-Xent against a brute-force loop over anchors and against closed-form values."""

from __future__ import annotations

import math

import pytest
import torch

from twinview.pretrain.objectives.losses import (
    barlow_twins,
    dino,
    info_nce,
    multi_positive_nt_xent,
    negative_cosine,
    nt_xent,
    pairwise_contrastive,
    supcon,
    triplet,
    vicreg,
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


# ---- BYOL/SimSiam, Barlow Twins, VICReg, DINO: the papers' formulas written out element by element ----


def negative_cosine_loop(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64)
    for i in range(len(p)):
        total = total + ((p[i] / p[i].norm() - z[i] / z[i].norm()) ** 2).sum()  # BYOL eq. 2
    return total / len(p)


def test_negative_cosine_matches_loop() -> None:
    p, z = _rand(6, 5, seed=10), _rand(6, 5, seed=11)
    _assert_same_value_and_grad(negative_cosine(p, z), negative_cosine_loop(p, z), [p, z])


def test_negative_cosine_hand_computed_and_simsiam() -> None:
    p = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 3.0], [1.0, 0.0, 0.0]])
    assert negative_cosine(p, 2.5 * p).item() == pytest.approx(0.0, abs=1e-6)  # parallel
    assert negative_cosine(p, -0.5 * p).item() == pytest.approx(4.0, rel=1e-6)  # opposite
    orthogonal = torch.tensor([[-2.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -4.0]])
    assert negative_cosine(p, orthogonal).item() == pytest.approx(2.0, rel=1e-6)
    p, z = _rand(6, 5, seed=12), _rand(6, 5, seed=13)
    simsiam_d = -torch.nn.functional.cosine_similarity(p, z, dim=1).mean()  # SimSiam's D(p, z)
    assert negative_cosine(p, z).item() == pytest.approx(2 + 2 * simsiam_d.item(), rel=1e-6)


def test_negative_cosine_sends_gradient_to_an_undetached_target() -> None:
    p, z = _rand(4, 3, seed=14), _rand(4, 3, seed=15)
    negative_cosine(p, z).backward()  # the caller detaches the target, not the loss
    assert p.grad is not None and z.grad is not None


def barlow_twins_loop(z_a: torch.Tensor, z_b: torch.Tensor, lambd: float) -> torch.Tensor:
    m, d = z_a.shape

    def standardise(z: torch.Tensor, i: int) -> list[torch.Tensor]:
        mean = sum(z[b, i] for b in range(m)) / m
        var = sum((z[b, i] - mean) ** 2 for b in range(m)) / m  # biased, as BatchNorm1d in training
        return [(z[b, i] - mean) / torch.sqrt(var + 1e-5) for b in range(m)]

    a = [standardise(z_a, i) for i in range(d)]
    b = [standardise(z_b, j) for j in range(d)]
    total = torch.zeros((), dtype=torch.float64)
    for i in range(d):
        for j in range(d):
            c_ij = sum(a[i][k] * b[j][k] for k in range(m)) / m
            total = total + ((1 - c_ij) ** 2 if i == j else lambd * c_ij**2)
    return total


@pytest.mark.parametrize("lambd", [0.0, 5e-3, 0.5])
def test_barlow_twins_matches_loop(lambd: float) -> None:
    z_a, z_b = _rand(6, 5, seed=16), _rand(6, 5, seed=17)
    _assert_same_value_and_grad(barlow_twins(z_a, z_b, lambd), barlow_twins_loop(z_a, z_b, lambd), [z_a, z_b])


def _hadamard_columns() -> torch.Tensor:
    """``(8, 7)`` the columns of an 8 x 8 Hadamard matrix but the constant one: entries +-1, each of
    mean 0 and (biased) variance 1, mutually orthogonal: standardised and decorrelated."""
    h = torch.tensor([[1.0]])
    for _ in range(3):
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)])
    return h[:, 1:]


def test_barlow_twins_hand_computed() -> None:
    z = _hadamard_columns()  # BN divides by sqrt(1 + 1e-5), so C = I / sqrt(1 + 1e-5)^2
    shrink = 1 / (1 + 1e-5)
    assert barlow_twins(z, z.clone()).item() == pytest.approx(7 * (1 - shrink) ** 2, abs=1e-9)  # ~0
    assert barlow_twins(3 * z + 1, z).item() == pytest.approx(7 * (1 - shrink) ** 2, abs=1e-9)  # per-dim affine
    # lambda = 0, the on-diagonal term alone: opposite views give C_ii = -shrink, orthogonal ones C = 0
    assert barlow_twins(z, -z, lambd=0.0).item() == pytest.approx(7 * (1 + shrink) ** 2, rel=1e-6)
    assert barlow_twins(z[:, :3], z[:, 3:6], lambd=0.0).item() == pytest.approx(3.0, rel=1e-6)
    # two swapped columns: C = [[0, s], [s, 0]], so L = 2 * 1^2 + lambda * 2 s^2
    assert barlow_twins(z[:, :2], z[:, [1, 0]], lambd=0.3).item() == pytest.approx(2 + 0.3 * 2 * shrink**2, rel=1e-6)


def vicreg_loop(z_a: torch.Tensor, z_b: torch.Tensor, sim: float, var: float, cov: float) -> torch.Tensor:
    m, d = z_a.shape
    invariance = sum((z_a[b, i] - z_b[b, i]) ** 2 for b in range(m) for i in range(d)) / (m * d)

    def variance_and_covariance(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = [sum(z[b, i] for b in range(m)) / m for i in range(d)]
        c = [
            [sum((z[b, i] - mean[i]) * (z[b, j] - mean[j]) for b in range(m)) / (m - 1) for j in range(d)]
            for i in range(d)
        ]
        v = sum(torch.clamp(1 - torch.sqrt(c[i][i] + 1e-4), min=0) for i in range(d)) / d
        off = sum(c[i][j] ** 2 for i in range(d) for j in range(d) if i != j) / d
        return v, off

    v_a, c_a = variance_and_covariance(z_a)
    v_b, c_b = variance_and_covariance(z_b)
    return sim * invariance + var * (v_a / 2 + v_b / 2) + cov * (c_a + c_b)


@pytest.mark.parametrize("weights", [(25.0, 25.0, 1.0), (1.0, 0.5, 3.0)])
@pytest.mark.parametrize("scale", [0.3, 2.0])  # below 1 the std hinge is active, above it is not
def test_vicreg_matches_loop(weights: tuple[float, float, float], scale: float) -> None:
    z_a, z_b = _rand(6, 5, seed=18), _rand(6, 5, seed=19)
    with torch.no_grad():
        z_a.mul_(scale), z_b.mul_(scale)
    _assert_same_value_and_grad(vicreg(z_a, z_b, *weights), vicreg_loop(z_a, z_b, *weights), [z_a, z_b])


def test_vicreg_hand_computed() -> None:
    z = _rand(6, 5, seed=20).detach()
    assert vicreg(z, z.clone(), 1.0, 0.0, 0.0).item() == 0.0  # identical views: no invariance term
    # z_a centred [[1, 0], [-1, 0]]: Var (2, 0), std (sqrt(2.0001), 0.01), Cov off-diagonal 0
    # z_b [[1, 1], [-1, -1]]: Var (2, 2), Cov off-diagonal 2 and 2: c = (4 + 4) / 2
    # s = (0 + 0 + 0 + 4) / 4 = 1;  v = (0 + 0.99) / 2 / 2 + 0 = 0.2475;  L = 25 + 25 * 0.2475 + 4
    z_a, z_b = torch.tensor([[1.0, 1.0], [-1.0, 1.0]]), torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    assert vicreg(z_a, z_b).item() == pytest.approx(25 + 25 * 0.2475 + 4, rel=1e-6)


def dino_loop(
    student: list[torch.Tensor], teacher: list[torch.Tensor], center: torch.Tensor, ts: float, tt: float
) -> torch.Tensor:
    n, k = student[0].shape
    terms = []
    for i, t in enumerate(teacher):
        for j, s in enumerate(student):
            if i == j:
                continue
            pair = torch.zeros((), dtype=torch.float64)
            for b in range(n):
                q_den = sum(torch.exp((t[b, c] - center[c]) / tt) for c in range(k))
                p_den = sum(torch.exp(s[b, c] / ts) for c in range(k))
                for c in range(k):
                    q = torch.exp((t[b, c] - center[c]) / tt) / q_den
                    pair = pair - q.detach() * (s[b, c] / ts - torch.log(p_den))
            terms.append(pair / n)
    return sum(terms) / len(terms)


@pytest.mark.parametrize("ts,tt", [(0.1, 0.04), (0.2, 0.07), (1.0, 1.0)])
def test_dino_matches_loop_and_sends_no_gradient_to_the_teacher(ts: float, tt: float) -> None:
    student = [_rand(6, 7, seed=21 + v) for v in range(4)]  # V = 4 views, the first G = 2 global
    teacher = [_rand(6, 7, seed=31 + v) for v in range(2)]
    center = torch.linspace(-0.2, 0.3, 7, dtype=torch.float64)
    _assert_same_value_and_grad(
        dino(student, teacher, center[None], ts, tt), dino_loop(student, teacher, center, ts, tt), student
    )
    dino(student, teacher, center, ts, tt).backward()
    assert all(t.grad is None for t in teacher) and all(s.grad is not None for s in student)


@pytest.mark.parametrize("ts", [0.1, 0.5])
def test_dino_with_a_uniform_teacher_hand_computed(ts: float) -> None:
    # Teacher outputs equal to the center: q = 1/K whatever the temperature. A student row (a, 0, ..., 0)
    # then costs -1/K sum_k log p_k = log(e^{a/ts} + K - 1) - a / (ts K), for every pair of views.
    k, a = 7, 0.8
    center = torch.randn(k)
    teacher = [center.expand(5, k).clone() for _ in range(2)]
    row = torch.zeros(k)
    row[0] = a
    student = [row.expand(5, k).clone() for _ in range(3)]
    expected = math.log(math.exp(a / ts) + k - 1) - a / (ts * k)
    assert dino(student, teacher, center, ts, 0.04).item() == pytest.approx(expected, rel=1e-6)
    assert dino([torch.zeros(5, k)] * 2, teacher, center, ts).item() == pytest.approx(math.log(k), rel=1e-6)
