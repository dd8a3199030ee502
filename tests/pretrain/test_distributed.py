"""Losses across 2 CPU processes (gloo) equal one process on the concatenated batch, gradients too."""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from twinview.pretrain import distributed
from twinview.pretrain.objectives import registry
from twinview.pretrain.objectives.losses import (
    barlow_twins,
    dino,
    multi_positive_nt_xent,
    negative_cosine,
    nt_xent,
    supcon,
    vicreg,
)
from twinview.pretrain.objectives.moco import KeyQueue, encode_keys_without_bn_leak

WORLD = 2
N, D_IN, D = 6, 5, 4  # per-process batch, input and embedding widths
LOSSES = ("nt_xent", "supcon", "multi_positive", "barlow_twins", "vicreg", "negative_cosine", "dino", "dcl")


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x_a = torch.randn(WORLD * N, D_IN, generator=g, dtype=torch.float64)
    x_b = torch.randn(WORLD * N, D_IN, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (WORLD * N,), generator=g)
    return x_a, x_b, labels


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(D_IN, D).double()


@functools.cache
def _dcl() -> Callable[..., torch.Tensor]:
    """``dcl`` of examples/dcl_objective.py, loaded from its path; the registry is left as it was."""
    path = Path(__file__).resolve().parents[2] / "examples" / "dcl_objective.py"
    spec = importlib.util.spec_from_file_location("_dcl_objective_for_test_distributed", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # the module's dataclass looks itself up there
    saved = registry.OBJECTIVES.pop("dcl", None)
    try:
        spec.loader.exec_module(module)
    finally:
        registry.OBJECTIVES.pop("dcl", None)
        if saved is not None:
            registry.OBJECTIVES["dcl"] = saved
    return module.dcl


def _losses(model: nn.Module, x_a: torch.Tensor, x_b: torch.Tensor, labels: torch.Tensor) -> dict[str, Callable]:
    """Each loss as a thunk: a test computes only the one it compares."""
    z_a, z_b, z_c = model(x_a), model(x_b), model(x_a * 0.5 - x_b)  # z_c: a third (multi-crop) view
    center = torch.linspace(-0.1, 0.2, D, dtype=torch.float64)  # DINO's teacher center, fixed
    return {
        "nt_xent": lambda: nt_xent(z_a, z_b, 0.2),
        "supcon": lambda: supcon(torch.cat([z_a, z_b]), labels.repeat(2), 0.1),
        "multi_positive": lambda: multi_positive_nt_xent([z_a, z_b, z_c], 0.2),
        "barlow_twins": lambda: barlow_twins(z_a, z_b, 0.05),
        "vicreg": lambda: vicreg(z_a, z_b),
        "negative_cosine": lambda: negative_cosine(z_a, z_b.detach()) + negative_cosine(z_b, z_a.detach()),
        "dino": lambda: dino([z_a, z_b, z_c], [z_a * 1.5, z_b * 1.5], center, 0.1, 0.04),
        "dcl": lambda: _dcl()(z_a, z_b, 0.2),
    }


def _reference() -> dict[str, tuple[float, list[torch.Tensor]]]:
    x_a, x_b, labels = _data()
    out = {}
    for name in LOSSES:
        model = _model()
        loss = _losses(model, x_a, x_b, labels)[name]()
        loss.backward()
        out[name] = (loss.item(), [p.grad.clone() for p in model.parameters()])
    return out


def _worker(rank: int, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        x_a, x_b, labels = _data()
        rows = slice(rank * N, (rank + 1) * N)
        out = {"gathered": distributed.gather(torch.full((2,), float(rank)))}
        for name in LOSSES:
            model = nn.parallel.DistributedDataParallel(_model())
            loss = _losses(model, x_a[rows], x_b[rows], labels[rows])[name]()
            loss.backward()  # DDP averages the parameter gradients over the processes
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            out[name] = (mean_loss.item() / WORLD, [p.grad.clone() for p in model.parameters()])
        queue = KeyQueue(size=8, dim=3)
        for step in range(3):  # 3 x (2 processes x 2 keys) = 12 > 8: wraps around
            queue.enqueue(torch.full((2, 3), 10.0 * step + rank) + torch.arange(3.0))
        out["queue"] = queue.keys.clone()
        torch.manual_seed(0)
        linear = nn.Linear(D_IN, 3).double()  # same weights on both processes
        generator = torch.Generator().manual_seed(1)
        out["shuffled_keys"] = encode_keys_without_bn_leak(linear, x_a[rows], splits=1, generator=generator)
        out["direct_keys"] = linear(x_a[rows]).detach()
        from twinview.augment.sampling import ViewRNG

        views_rng = ViewRNG(seed=10 + rank)
        state = views_rng.state_dict()  # collective: every process's state
        first = torch.rand(3, generator=views_rng.generator)
        views_rng.load_state_dict(state)
        out["views_rng"] = (len(state["per_rank"]), first, torch.rand(3, generator=views_rng.generator))
        torch.save(out, f"{out_file}.{rank}")
        dist.barrier()  # both done before either tears gloo down (a rank leaving early aborted its peer once)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("dist")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_worker, args=(str(tmp / "init"), str(tmp / "out")), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"out.{r}", weights_only=False) for r in range(WORLD)]


@pytest.mark.slow
@pytest.mark.parametrize("name", LOSSES)
def test_two_processes_match_one_process_on_the_whole_batch(two_process_results: list[dict], name: str) -> None:
    expected_loss, expected_grads = _reference()[name]
    for result in two_process_results:
        loss, grads = result[name]
        assert loss == pytest.approx(expected_loss, rel=1e-6)  # the losses compute in float32
        for got, want in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_gather_puts_rows_in_rank_order(two_process_results: list[dict]) -> None:
    for result in two_process_results:
        assert result["gathered"].tolist() == [0.0, 0.0, 1.0, 1.0]


def test_queue_is_identical_on_every_process_and_holds_everyones_keys(two_process_results: list[dict]) -> None:
    first, second = (r["queue"] for r in two_process_results)
    assert torch.equal(first, second)
    # step 2 (rank 0, rank 1) overwrote rows 0-3; rows 4-7 still hold step 1 (rank 0, rank 1)
    rows = [round(float(v), 4) for v in first[:, 0] * (first[:, 0] ** 2 + first[:, 1] ** 2 + first[:, 2] ** 2) ** -0.5]
    expected = []
    for step, rank in [(2, 0), (2, 0), (2, 1), (2, 1), (1, 0), (1, 0), (1, 1), (1, 1)]:
        v = torch.tensor([10.0 * step + rank]) + torch.arange(3.0)
        expected.append(round(float(v[0] / v.norm()), 4))
    assert rows == expected


def test_shuffle_bn_gives_each_process_the_keys_of_its_own_images(two_process_results: list[dict]) -> None:
    for result in two_process_results:
        torch.testing.assert_close(result["shuffled_keys"], result["direct_keys"])


def test_views_rng_checkpoint_restores_each_processs_own_stream(two_process_results: list[dict]) -> None:
    draws = []
    for result in two_process_results:
        count, first, replayed = result["views_rng"]
        assert count == WORLD and torch.equal(first, replayed)
        draws.append(first)
    assert not torch.equal(draws[0], draws[1])  # the processes' streams differ


def test_single_process_collectives_are_identities() -> None:
    x = torch.randn(3, 2, requires_grad=True)
    assert distributed.world_size() == 1 and distributed.rank() == 0
    assert distributed.gather_with_grad(x) is x and torch.equal(distributed.gather(x), x)
