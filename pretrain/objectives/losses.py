"""Contrastive and metric-learning losses: pure functions of embeddings that return a scalar.

Shapes in comments: ``N`` samples on this process, ``M = world * N`` over all processes, ``D``
embedding width, ``K`` size of a bank of negatives. Losses that contrast against other samples take
their negatives from every process when ``torch.distributed`` is initialised, through an all-gather
that keeps the gradient (:func:`twinview.pretrain.distributed.gather_with_grad`): each process
scores its own anchors against all candidates, so the mean of the per-process losses (what DDP
optimises) equals the loss of one process on the concatenated batch, gradients included.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from twinview.pretrain import distributed

TRIPLET_MINING = ("batch_all", "batch_hard", "semi_hard")


def nt_xent(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """NT-Xent, the normalized temperature-scaled cross entropy of SimCLR (Chen et al., ICML 2020).

    With ``z`` the 2M L2-normalised embeddings of both views and ``s_ij = z_i . z_j / t``, each
    sample i has exactly one positive p(i) (the other view of the same image) and 2M - 2 negatives:

        l_i = -log( exp(s_{i,p(i)}) / sum_{k != i} exp(s_ik) ),    L = 1/(2M) sum_i l_i

    Args:
        z_a: ``(N, D)`` embeddings of the first views.
        z_b: ``(N, D)`` embeddings of the second views; row i is the positive of ``z_a`` row i.
        temperature: t > 0.

    Returns:
        The mean loss over this process's 2N anchors (computed in float32).
    """
    n = z_a.shape[0]
    a, b = F.normalize(z_a.float(), dim=1), F.normalize(z_b.float(), dim=1)  # (N, D)
    a_all, b_all = distributed.gather_with_grad(a), distributed.gather_with_grad(b)  # (M, D)
    m, offset = a_all.shape[0], distributed.rank() * n
    anchors = torch.cat([a, b])  # (2N, D)
    logits = anchors @ torch.cat([a_all, b_all]).T / temperature  # (2N, 2M)
    local = torch.arange(n, device=a.device) + offset  # this process's rows among the M
    self_index = torch.cat([local, local + m])  # (2N,) each anchor's own column
    logits[torch.arange(2 * n, device=a.device), self_index] = float("-inf")  # never its own negative
    targets = torch.cat([local + m, local])  # (2N,) the other view
    return F.cross_entropy(logits, targets)


def info_nce(query: torch.Tensor, key: torch.Tensor, negatives: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """InfoNCE with an external bank of negatives (Oord et al. 2018; MoCo, He et al., CVPR 2020).

        l_i = -log( exp(q_i . k_i / t) / (exp(q_i . k_i / t) + sum_j exp(q_i . n_j / t)) )

    with q, k and the negatives L2-normalised; L is the mean over the N queries.

    Args:
        query: ``(N, D)`` queries.
        key: ``(N, D)`` positive keys (row i for query i); usually from a momentum encoder, detached.
        negatives: ``(K, D)`` bank of negative keys (the MoCo queue); no gradient flows into it.
        temperature: t > 0.

    Returns:
        The scalar mean loss.
    """
    q = F.normalize(query.float(), dim=1)  # (N, D)
    k = F.normalize(key.float(), dim=1)  # (N, D)
    bank = F.normalize(negatives.float().detach(), dim=1)  # (K, D)
    positive = (q * k).sum(dim=1, keepdim=True)  # (N, 1)
    logits = torch.cat([positive, q @ bank.T], dim=1) / temperature  # (N, 1 + K)
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


def supcon(z: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss, L^sup_out of Khosla et al., NeurIPS 2020 (eq. 2).

    Over all views z (L2-normalised) with A(i) every other view and P(i) the views with i's label:

        l_i = -1/|P(i)| sum_{p in P(i)} log( exp(z_i . z_p / t) / sum_{a in A(i)} exp(z_i . z_a / t) )

    Anchors with no positive are left out of the mean. With two views per image and every image its
    own class, this is NT-Xent.

    Args:
        z: ``(N, D)`` embeddings, all views stacked (e.g. ``cat([z_a, z_b])``).
        labels: ``(N,)`` integer labels (repeat them for each view).
        temperature: t > 0.

    Returns:
        The mean loss over this process's anchors that have a positive.
    """
    n = z.shape[0]
    x = F.normalize(z.float(), dim=1)  # (N, D)
    x_all = distributed.gather_with_grad(x)  # (M, D)
    labels_all = distributed.gather(labels)  # (M,)
    rows = torch.arange(n, device=x.device)
    local = rows + distributed.rank() * n
    logits = x @ x_all.T / temperature  # (N, M), the only N x M float tensor of the forward besides one where()
    logits[rows, local] = float("-inf")  # in place: an anchor is not in its own denominator
    log_denominator = torch.logsumexp(logits, dim=1)  # (N,)
    positive = labels[:, None] == labels_all[None, :]  # (N, M) bool
    positive[rows, local] = False
    count = positive.sum(dim=1)  # (N,)
    positive_logits = torch.where(positive, logits, 0.0).sum(dim=1)  # (N,)
    per_anchor = -(positive_logits - count * log_denominator) / count.clamp_min(1)
    has = count > 0
    return torch.where(has, per_anchor, 0.0).sum() / has.sum().clamp_min(1)


def multi_positive_nt_xent(views: list[torch.Tensor], temperature: float = 0.2) -> torch.Tensor:
    """NT-Xent with more than two views per image (multi-crop; Caron et al., NeurIPS 2020): every
    other view of the same image is a positive, every view of another image (of every process) a
    negative. It is :func:`supcon` (Khosla et al. 2020, eq. 2) with each image its own class:

        l_i = -1/|P(i)| sum_{p in P(i)} log( exp(z_i . z_p / t) / sum_{a != i} exp(z_i . z_a / t) )

    over the V x M views, |P(i)| = V - 1. With two views it equals :func:`nt_xent`.

    Args:
        views: V ``(N, D)`` embeddings, one per view; row j of each is image j.
        temperature: t > 0.

    Returns:
        The mean loss over this process's V x N anchors.
    """
    n = views[0].shape[0]
    images = torch.arange(n, device=views[0].device) + distributed.rank() * n  # (N,) unique over processes
    return supcon(torch.cat(views), images.repeat(len(views)), temperature)  # (V * N, D), (V * N,)


def pairwise_contrastive(
    z_1: torch.Tensor, z_2: torch.Tensor, dissimilar: torch.Tensor, margin: float = 1.0
) -> torch.Tensor:
    """Margin contrastive loss of Hadsell, Chopra and LeCun, CVPR 2006 (a Siamese encoder on pairs).

        L = mean over pairs of (1 - Y) * 1/2 * D^2 + Y * 1/2 * max(0, m - D)^2

    with D the Euclidean distance between the pair's embeddings and Y = 1 for a dissimilar pair.

    Args:
        z_1: ``(N, D)`` embeddings of the first images of the pairs.
        z_2: ``(N, D)`` embeddings of the second images.
        dissimilar: ``(N,)`` Y: 1 (or True) where the pair is dissimilar, 0 where similar.
        margin: m > 0, how far apart dissimilar pairs must be before they stop contributing.

    Returns:
        The scalar mean loss.
    """
    y = dissimilar.to(torch.float32)  # (N,)
    squared = (z_1.float() - z_2.float()).pow(2).sum(dim=1)  # (N,) D^2, smooth at 0
    distance = squared.clamp_min(1e-12).sqrt()
    return ((1 - y) * 0.5 * squared + y * 0.5 * F.relu(margin - distance).pow(2)).mean()


def pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    """``(N, D)`` -> ``(N, N)`` Euclidean distances (gradient 0, not NaN, on the diagonal)."""
    x = x.float()
    squared = (x * x).sum(dim=1)
    d2 = squared[:, None] + squared[None, :] - 2 * x @ x.T
    return d2.clamp_min(1e-12).sqrt()


def triplet(z: torch.Tensor, labels: torch.Tensor, margin: float = 0.2, mining: str = "batch_hard") -> torch.Tensor:
    """Triplet margin loss with online mining inside the batch (Euclidean distances d).

    ``max(0, d(a, p) - d(a, n) + m)`` over triplets of an anchor a, a positive p (same label, not a)
    and a negative n (another label), chosen by ``mining``:

    * ``batch_all``: every valid triplet; the mean over those with a non-zero loss
      (Hermans, Beyer, Leibe 2017, "In Defense of the Triplet Loss").
    * ``batch_hard``: per anchor, its farthest positive and nearest negative; mean over anchors
      that have both (Hermans et al. 2017).
    * ``semi_hard``: per (anchor, positive) pair, the nearest negative farther than the positive,
      ``d(a, p) < d(a, n)``; when none is, the farthest negative (FaceNet, Schroff et al. 2015, as
      TensorFlow's ``triplet_semihard_loss``); mean over pairs.

    Args:
        z: ``(N, D)`` embeddings (normalise them first for distances in [0, 2]).
        labels: ``(N,)`` integer labels.
        margin: m >= 0.
        mining: One of ``batch_all``, ``batch_hard``, ``semi_hard``.

    Returns:
        The scalar loss (0 when the batch has no valid triplet).
    """
    if mining not in TRIPLET_MINING:
        raise ValueError(f"unknown triplet mining '{mining}'. Valid: {', '.join(TRIPLET_MINING)}.")
    d = pairwise_distances(z)  # (N, N)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    pos, neg = same & ~eye, ~same  # (N, N) masks
    # Means over masks divide by max(count, 1): 0 for a batch without valid triplets, no host sync.
    if mining == "batch_all":
        losses = F.relu(d[:, :, None] - d[:, None, :] + margin)  # (a, p, n)
        active = pos[:, :, None] & neg[:, None, :] & (losses > 0)
        return torch.where(active, losses, 0.0).sum() / active.sum().clamp_min(1)
    if mining == "batch_hard":
        hardest_pos = (d * pos).amax(dim=1)  # distances >= 0, so masked entries (0) never win
        hardest_neg = d.masked_fill(~neg, float("inf")).amin(dim=1)
        ok = pos.any(dim=1) & neg.any(dim=1)
        losses = F.relu(hardest_pos - hardest_neg + margin)
        return torch.where(ok, losses, 0.0).sum() / ok.sum().clamp_min(1)
    # semi_hard: for each (a, p), negatives farther than d(a, p)
    d_ap = d[:, :, None]  # (a, p, 1)
    d_an = d[:, None, :]  # (a, 1, n)
    farther = neg[:, None, :] & (d_an > d_ap)  # (a, p, n)
    nearest_farther = d_an.expand_as(farther).masked_fill(~farther, float("inf")).amin(dim=2)  # (a, p)
    farthest = d.masked_fill(~neg, float("-inf")).amax(dim=1, keepdim=True).expand_as(nearest_farther)
    chosen = torch.where(farther.any(dim=2), nearest_farther, farthest)  # (a, p)
    ok = pos & neg.any(dim=1, keepdim=True)
    losses = F.relu(d - chosen + margin)
    return torch.where(ok, losses, 0.0).sum() / ok.sum().clamp_min(1)


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's regression loss (Grill et al. 2020, "Bootstrap Your Own Latent", arXiv:2006.07733, eq. 2).

    The squared distance between the L2-normalised prediction and target:

        l_i = || p_i / |p_i| - z_i / |z_i| ||^2 = 2 - 2 cos(p_i, z_i),    L = 1/N sum_i l_i

    SimSiam (Chen & He 2021, "Exploring Simple Siamese Representation Learning", arXiv:2011.10566)
    minimises D(p, z) = -cos(p, z); ``negative_cosine = 2 + 2 D``, the same gradient up to a factor 2.
    Every term is per sample, so the mean of the per-process losses is the loss of the whole batch.

    Args:
        p: ``(N, D)`` predictions of the online branch.
        z: ``(N, D)`` targets. Not detached here: the caller passes the stop-gradient target (the
            momentum encoder's output for BYOL, ``z.detach()`` for SimSiam).

    Returns:
        The scalar mean loss over this process's N rows (computed in float32), in [0, 4].
    """
    p_n = F.normalize(p.float(), dim=1)  # (N, D)
    z_n = F.normalize(z.float(), dim=1)  # (N, D)
    return (2 - 2 * (p_n * z_n).sum(dim=1)).mean()


def _off_diagonal(x: torch.Tensor) -> torch.Tensor:
    """``(D, D)`` -> ``(D * (D - 1),)`` its off-diagonal entries (the Barlow Twins authors' view trick)."""
    d = x.shape[0]
    return x.flatten()[:-1].view(d - 1, d + 1)[:, 1:].flatten()


def barlow_twins(z_a: torch.Tensor, z_b: torch.Tensor, lambd: float = 5e-3) -> torch.Tensor:
    """Barlow Twins (Zbontar et al. 2021, "Barlow Twins: Self-Supervised Learning via Redundancy
    Reduction", arXiv:2103.03230, eq. 1).

    Over the global batch of M rows, each dimension is standardised over the batch as the authors'
    code does with ``BatchNorm1d(affine=False)`` in training mode, ``z^ = (z - mean) / sqrt(var + 1e-5)``
    (biased variance), and the cross-correlation of the two views is pushed to the identity:

        C_ij = 1/M sum_b z^a_bi z^b_bj,    L = sum_i (1 - C_ii)^2 + lambda sum_i sum_{j != i} C_ij^2

    Args:
        z_a: ``(N, D)`` embeddings of the first views.
        z_b: ``(N, D)`` embeddings of the second views; row i is the same image as ``z_a`` row i.
        lambd: lambda >= 0, the weight of the redundancy-reduction (off-diagonal) term.

    Returns:
        The scalar loss of the global batch, the same on every process (computed in float32).
    """
    a = distributed.gather_with_grad(z_a.float())  # (M, D)
    b = distributed.gather_with_grad(z_b.float())  # (M, D)
    m = a.shape[0]
    a = (a - a.mean(dim=0)) / torch.sqrt(a.var(dim=0, unbiased=False) + 1e-5)  # (M, D)
    b = (b - b.mean(dim=0)) / torch.sqrt(b.var(dim=0, unbiased=False) + 1e-5)  # (M, D)
    c = a.T @ b / m  # (D, D)
    on_diagonal = (1 - c.diagonal()).pow(2).sum()
    off_diagonal = _off_diagonal(c).pow(2).sum()
    return on_diagonal + lambd * off_diagonal


def vicreg(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    sim_weight: float = 25.0,
    var_weight: float = 25.0,
    cov_weight: float = 1.0,
) -> torch.Tensor:
    """VICReg (Bardes, Ponce, LeCun, ICLR 2022, "VICReg: Variance-Invariance-Covariance
    Regularization for Self-Supervised Learning", arXiv:2105.04906), as the authors' code
    (facebookresearch/vicreg, ``main_vicreg.py``) computes it:

        s = 1/(N D) sum_{b, i} (z^a_bi - z^b_bi)^2                   on this process's N rows
        v = 1/2 * 1/D sum_i relu(1 - S(z^a_i)) + 1/2 * 1/D sum_i relu(1 - S(z^b_i)),
            S(x) = sqrt(Var(x) + 1e-4), Var unbiased over the M rows of the global batch
        c = 1/D sum_{i != j} Cov(z^a)_ij^2 + 1/D sum_{i != j} Cov(z^b)_ij^2,
            Cov(z) = 1/(M - 1) sum_b (z_b - mean)(z_b - mean)^T
        L = sim_weight * s + var_weight * v + cov_weight * c

    Args:
        z_a: ``(N, D)`` embeddings of the first views.
        z_b: ``(N, D)`` embeddings of the second views; row i is the same image as ``z_a`` row i.
        sim_weight: lambda, the weight of the invariance term s.
        var_weight: mu, the weight of the variance term v.
        cov_weight: nu, the weight of the covariance term c.

    Returns:
        The scalar loss (computed in float32): s is this process's, v and c the global batch's.
    """
    a, b = z_a.float(), z_b.float()  # (N, D)
    invariance = F.mse_loss(a, b)
    a = distributed.gather_with_grad(a)  # (M, D)
    b = distributed.gather_with_grad(b)  # (M, D)
    m, d = a.shape
    a = a - a.mean(dim=0)
    b = b - b.mean(dim=0)
    std_a = torch.sqrt(a.var(dim=0) + 1e-4)  # (D,)
    std_b = torch.sqrt(b.var(dim=0) + 1e-4)  # (D,)
    variance = F.relu(1 - std_a).mean() / 2 + F.relu(1 - std_b).mean() / 2
    cov_a = a.T @ a / (m - 1)  # (D, D)
    cov_b = b.T @ b / (m - 1)  # (D, D)
    covariance = _off_diagonal(cov_a).pow(2).sum() / d + _off_diagonal(cov_b).pow(2).sum() / d
    return sim_weight * invariance + var_weight * variance + cov_weight * covariance


def dino(
    student: list[torch.Tensor],
    teacher: list[torch.Tensor],
    center: torch.Tensor,
    student_temperature: float = 0.1,
    teacher_temperature: float = 0.04,
) -> torch.Tensor:
    """DINO's self-distillation loss (Caron et al. 2021, "Emerging Properties in Self-Supervised
    Vision Transformers", arXiv:2104.14294, eq. 3 and Algorithm 1; the authors' ``DINOLoss``).

    With the teacher's centred, sharpened distributions over the K prototypes of its G global views
    and the student's of all V views (the first G the same global views):

        q_i = softmax((t_i - center) / teacher_temperature),    log p_j = log_softmax(s_j / student_temperature)
        L = 1/(G (V - 1)) sum_{i < G} sum_{j != i} 1/N sum_n -sum_k q_ink log p_jnk

    Every term is a per-sample mean, so the mean of the per-process losses is the global batch's.

    Args:
        student: V ``(N, K)`` student outputs, one per view; the first G are the global views, in
            the order of ``teacher``.
        teacher: G ``(N, K)`` teacher outputs of the global views; detached here (the teacher is
            updated by EMA, never by a gradient).
        center: ``(1, K)`` or ``(K,)`` the teacher's running center (no gradient).
        student_temperature: tau_s > 0.
        teacher_temperature: tau_t > 0.

    Returns:
        The scalar mean loss over the G (V - 1) pairs (computed in float32).
    """
    g, v = len(teacher), len(student)
    n = student[0].shape[0]
    shift = center.detach().float().reshape(1, 1, -1)  # (1, 1, K)
    t = torch.stack([x.detach().float() for x in teacher])  # (G, N, K)
    q = F.softmax((t - shift) / teacher_temperature, dim=-1)  # (G, N, K)
    log_p = F.log_softmax(torch.stack([x.float() for x in student]) / student_temperature, dim=-1)  # (V, N, K)
    # (G, V) batch-mean cross entropy of each pair; element-wise products and sums, which autocast
    # keeps in float32 (a matmul would run in bf16/fp16)
    cross = torch.stack([-(q_i * log_p).sum(dim=-1).sum(dim=-1) / n for q_i in q])
    pairs = ~torch.eye(g, v, dtype=torch.bool, device=cross.device)  # (G, V) i != j: not the same view
    return torch.where(pairs, cross, 0.0).sum() / (g * (v - 1))
