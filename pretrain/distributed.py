"""Collectives the objectives need, correct with and without ``torch.distributed``.

Without an initialised process group every function here is the identity, so a loss written with
them runs unchanged on one CPU, one GPU or many processes launched by ``accelerate launch``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from accelerate.state import PartialState


def world_size() -> int:
    """Number of processes (1 without an initialised process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's index (0 without an initialised process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward hands each process the gradient of its own rows, summed over every
    process's loss (an all-reduce of the full gradient, then this process's slice).

    ``torch.distributed.all_gather`` alone returns tensors with no gradient path, which silently
    drops the gradient that flows through other processes' negatives; ``torch.distributed.nn``'s
    version exists but its backward has changed between releases, so the contract is kept here.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.rows = x.shape[0]
        return gather(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """``(n, ...)`` per process -> ``(world * n, ...)``, rows in rank order, differentiable.

    Every process must pass the same shape. Identity on a single process.
    """
    if world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather(x: torch.Tensor) -> torch.Tensor:
    """``(n, ...)`` per process -> ``(world * n, ...)`` in rank order, without gradient (MoCo keys)."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def broadcast(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """``x`` from process ``src`` on every process (in place); identity on a single process."""
    if world_size() > 1:
        dist.broadcast(x, src)
    return x


def to_device_async(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copies a CPU tensor to ``device`` without making the host wait (pinned, non-blocking on CUDA).

    A plain ``.to("cuda")`` of pageable memory synchronises the stream; random draws made on the
    host (from CPU generators that every process seeds alike) use this instead.
    """
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


@torch.no_grad()
def mean_over_processes(x: torch.Tensor) -> torch.Tensor:
    """The element-wise mean over processes, as a new tensor (identity on a single process)."""
    x = x.clone()
    if world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= world_size()
    return x


def all_reduce_min(x: torch.Tensor) -> torch.Tensor:
    """The element-wise minimum over processes, as a new tensor (on the device, no host sync)."""
    x = x.clone()
    if world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MIN)
    return x


def everyone(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on every process (a host sync: for decisions outside the step)."""
    return bool(all_reduce_min(torch.tensor([int(flag)], device=device)).item())


def gather_objects(obj: object) -> list[object]:
    """Every process's ``obj`` (picklable), in rank order; ``[obj]`` on a single process."""
    if world_size() == 1:
        return [obj]
    out: list[object] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def synchronize(device: torch.device) -> None:
    """Waits for the device's queued work (a no-op on a CPU, which computes synchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def use_cpu(cpu_setting: bool) -> bool:
    """Whether Accelerate must be told ``cpu=True``: asked for (the setting, or ``accelerate launch
    --cpu``, which sets ``ACCELERATE_USE_CPU``), or no accelerator on the machine.

    Accelerate counts the processes of ``accelerate launch``/``torchrun`` on a machine without an
    accelerator only when told ``cpu=True``; otherwise each process trains alone.
    """
    launched_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return cpu_setting or launched_cpu or not torch.accelerator.is_available()


def process_state(cpu_setting: bool) -> PartialState:
    """Accelerate's process state (device, rank, process count), its process group joined through
    :func:`join_process_group` first: every entry point asks here rather than ``PartialState()``."""
    from accelerate.state import PartialState

    cpu = use_cpu(cpu_setting)
    join_process_group(cpu)
    return PartialState(cpu=cpu)


ROUND_PREFIX = "twinview/round_"  # + torchrun's restart count: the process group's keys in the agent's store
_joins = 0  # process groups this process has joined (a run, then an evaluation, in one process)


def join_process_group(cpu: bool) -> None:
    """Creates the default process group under torchrun's elastic agent with its keys under a
    prefix of this round (``TORCHELASTIC_RESTART_COUNT``), so a restarted round never reads the last
    round's.

    ``torchrun --max-restarts`` (and ``accelerate launch --max_restarts``, which runs the same agent)
    hands every round of training processes the same store, hosted by the agent for the whole job,
    and torch's own ``env://`` rendezvous writes the process group's keys there with a prefix that is
    the same in every round (torch 2.14: ``torch/distributed/rendezvous.py``, "We create a new
    TCPStore for every retry so no need to add prefix", which holds for the rendezvous but not for
    the store the agent keeps). After a ``kill -9`` the restarted round then finds the dead round's
    keys: a process reads its peer's old gloo address and fails to connect ("Connection refused"),
    or the round's collectives pair up wrongly and hang (seen in ``tests/pretrain/test_multinode.py``;
    pytorch/pytorch#135712 reports the same for NCCL's unique id). The prefix also counts the groups
    this process joined, so a second group after the first was destroyed (training, then an
    evaluation in the same process) does not read the first one's keys either.

    The restart count is each agent's own. With torchrun's static rendezvous (fixed node ranks, as
    ``examples/slurm/node.sh`` launches) a failed process fails its group on every node, every agent
    restarts once per failure, and the counts agree. The elastic ``c10d`` rendezvous restarts without
    counting on a membership change, so there the agent must not share its store with the training
    processes: ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (node.sh exports it), which makes this a no-op
    and gives every round a fresh store (docs/SCALE.md).

    A no-op when a process group exists, outside torch's elastic agent, with one process, or on an
    accelerator other than CUDA (Accelerate's own set-up runs there). The backend: NCCL on CUDA, as
    Accelerate picks; gloo on a CPU, which every torch build has (Accelerate would pick oneCCL or
    MPI where one is installed). Timeouts are torch's defaults for the backend, as Accelerate leaves
    them (NCCL 10 minutes, gloo 30).
    """
    global _joins
    if dist.is_initialized() or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = not cpu and torch.cuda.is_available()
    if world < 2 or (not cpu and not cuda):
        return
    from torch.distributed.constants import default_pg_nccl_timeout, default_pg_timeout

    timeout = default_pg_nccl_timeout if cuda and default_pg_nccl_timeout is not None else default_pg_timeout
    agent_store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False, timeout=timeout
    )
    prefix = f"{ROUND_PREFIX}{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/join_{_joins}"
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        store=dist.PrefixStore(prefix, agent_store),
        rank=int(os.environ["RANK"]),
        world_size=world,
        timeout=timeout,
    )
    _joins += 1


def cpu_computes_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX): there bf16 autocast is ~1.8x
    faster than fp32 (docs/BENCHMARKS.md); elsewhere it is emulated and slower."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch's private probes (>= 2.3)
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)
