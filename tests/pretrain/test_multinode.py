"""Past one machine, on one machine: two nodes on loopback (gloo) through the SLURM example
(``examples/slurm/pretrain.sbatch`` with stand-ins for ``srun`` and ``scontrol``, and its node
launcher ``examples/slurm/node.sh``, both unchanged), with ``accelerate launch`` and ``torchrun``; a
worker killed with ``kill -9`` under ``torchrun --max-restarts``; SLURM's SIGUSR1 warning or a
SIGTERM, then the requeued command. Each ends with the weights of an uninterrupted 1 node x 2
processes run, bitwise.

Each node runs in its own working directory with a relative ``train.output_dir``, as machines
without a shared disk would: the run directory is written on global rank 0's node only.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from twinview.pretrain.runs import checkpoints

from .test_multiprocess import SETUP
from .test_shards import write_shards

pytestmark = [
    pytest.mark.slow,  # end-to-end: make test-fast leaves these out
    pytest.mark.skipif(sys.platform == "win32", reason="gloo launch and POSIX signals"),
]

SLURM = Path(__file__).resolve().parents[2] / "examples" / "slurm"
NODE_SH = SLURM / "node.sh"
FAKE_SRUN = """#!/bin/bash
# srun's stand-in: its command once per node, each in $FAKE_ROOT/node<i>, with SLURM_NODEID set
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NNODES; i++)); do
  (mkdir -p "$FAKE_ROOT/node$i" && cd "$FAKE_ROOT/node$i" && SLURM_NODEID=$i exec "$@") &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
exit $status
"""
FAKE_SCONTROL = """#!/bin/bash
case "$1" in
  show) echo 127.0.0.1 ;;
  requeue) echo "$2" >> "$FAKE_ROOT/requeued" ;;
esac
"""
NAME = "r"  # train.run_name: --resume auto needs one
ARGS = [*SETUP, "train.batch_size=4", "train.output_dir=runs", f"train.run_name={NAME}"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(**extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        **extra,
    }


def _nodes(
    nodes: int, procs: int, args: list[str], root: Path, launcher: str = "accelerate", **extra: str
) -> list[subprocess.Popen]:
    """``examples/slurm/node.sh ARGS`` once per node, as a person starts it on each machine, each
    node in ``root/nodeN``."""
    port = str(_free_port())
    started = []
    for node in range(nodes):
        cwd = root / f"node{node}"
        cwd.mkdir(parents=True, exist_ok=True)
        env = _env(  # the variables of a start by hand (the SLURM ones: test_the_slurm_script_...)
            NNODES=str(nodes),
            NODE_RANK=str(node),
            MAIN_ADDR="127.0.0.1",
            MAIN_PORT=port,
            PROCS_PER_NODE=str(procs),
            LAUNCHER=launcher,
            **extra,
        )
        started.append(
            subprocess.Popen(
                ["bash", str(NODE_SH), *args],
                cwd=cwd,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
        )
    return started


def _sbatch(args: list[str], root: Path) -> subprocess.Popen:
    """``examples/slurm/pretrain.sbatch ARGS`` as SLURM would run it on 2 nodes, with stand-ins for
    ``srun`` (each node in its own folder) and ``scontrol``."""
    bin_dir = root / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = _env(
        PATH=f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        FAKE_ROOT=str(root),
        NODE_SH=str(NODE_SH),
        SLURM_NNODES="2",
        SLURM_JOB_NODELIST="node[0-1]",
        SLURM_JOB_ID="7",
        MAIN_PORT=str(_free_port()),
        PROCS_PER_NODE="1",
    )
    cmd = ["bash", str(SLURM / "pretrain.sbatch"), *args]
    return subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(started: list[subprocess.Popen], timeout: float = 300) -> list[str]:
    errs = []
    for proc in started:
        _, err = proc.communicate(timeout=timeout)
        errs.append(err)
    for proc, err in zip(started, errs, strict=True):
        assert proc.returncode == 0, err[-3000:]
    return errs


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "model.safetensors")


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if r["kind"] == "step"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """The same 24 images as a folder and as 2 WebDataset shards (one per process)."""
    from ..conftest import make_image_folder

    root = tmp_path_factory.mktemp("multinode-data")
    folder = make_image_folder(root / "images")
    (root / "shards").mkdir()
    write_shards(root / "shards", folder, shards=2)
    return {
        "folder": [f"data.path={folder}"],
        "shards": [f"data.path={root / 'shards'}/train-{{0000..0001}}.tar", "train.max_steps_per_epoch=3"],
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, data: dict[str, list[str]]) -> dict[str, Path]:
    """1 node x 2 processes, uninterrupted: the folder for 12 epochs, the shards for 2."""
    root = tmp_path_factory.mktemp("multinode-reference")
    runs = {
        "folder": _nodes(1, 2, [*ARGS, *data["folder"], "train.epochs=12"], root / "folder"),
        "shards": _nodes(1, 2, [*ARGS, *data["shards"], "train.epochs=2"], root / "shards"),
    }
    for started in runs.values():
        _finish(started)
    return {kind: root / kind / "node0" / "runs" / NAME for kind in runs}


def test_two_nodes_train_the_weights_of_one_node_with_two_processes(
    tmp_path: Path, data: dict[str, list[str]], reference: dict[str, Path]
) -> None:
    """``torchrun`` on shards: 2 nodes x 1 process = 1 node x 2 processes, bitwise (each node reads
    its own share), and only global rank 0's node has a run directory."""
    _finish(_nodes(2, 1, [*ARGS, *data["shards"], "train.epochs=2"], tmp_path, "torchrun"))
    main = tmp_path / "node0" / "runs" / NAME
    _assert_same(_weights(main), _weights(reference["shards"]))
    assert _steps(main) == _steps(reference["shards"])
    assert not (tmp_path / "node1" / "runs").exists()  # node 1 wrote nothing: no config, logs or checkpoints


def test_the_slurm_script_on_two_nodes_stops_at_its_warning_requeues_and_continues(
    tmp_path: Path, data: dict[str, list[str]], reference: dict[str, Path], wait_for_log_lines: object
) -> None:
    """``examples/slurm/pretrain.sbatch`` on 2 nodes x 1 process (``accelerate launch``, a folder,
    the run directory on a disk both nodes see): SLURM's SIGUSR1 warning to each node's launcher
    stops both processes after the same step with a checkpoint, the script requeues the job, and
    the requeued job's run ends with the weights of an uninterrupted 1 node x 2 processes run,
    bitwise."""
    args = [*ARGS, *data["folder"], "train.epochs=12", f"train.output_dir={tmp_path / 'shared'}"]
    job = _sbatch(args, tmp_path)
    run_dir = tmp_path / "shared" / NAME
    assert callable(wait_for_log_lines)
    wait_for_log_lines(run_dir / "metrics.jsonl", 6)
    launchers = [p for p in psutil.Process(job.pid).children(recursive=True) if "--machine_rank" in p.cmdline()]
    assert len(launchers) == 2
    for launcher in launchers:  # as SLURM signals the job step: the launchers must pass it on
        launcher.send_signal(signal.SIGUSR1)
    _, err = job.communicate(timeout=180)
    assert job.returncode != 0 and err.count("interrupted by SIGUSR1") == 2, err[-3000:]
    assert (tmp_path / "requeued").read_text().split() == ["7"]  # scontrol requeue $SLURM_JOB_ID
    assert "_step_" in checkpoints(run_dir)[-1].name

    requeued = _sbatch(args, tmp_path)
    out, err = requeued.communicate(timeout=300)
    assert requeued.returncode == 0, err[-3000:]
    assert "Continuing" in out and (tmp_path / "requeued").read_text().split() == ["7"]  # not requeued again
    _assert_same(_weights(run_dir), _weights(reference["folder"]))
    assert _steps(run_dir) == _steps(reference["folder"])


def test_a_worker_killed_mid_run_is_restarted_by_torchrun_and_resumes_exactly(
    tmp_path: Path, data: dict[str, list[str]], reference: dict[str, Path], wait_for_log_lines: object
) -> None:
    """``torchrun --max-restarts 2``: rank 1 gets ``kill -9`` mid-run; the agent restarts the group,
    ``--resume auto`` continues from the newest checkpoint, and the weights equal the uninterrupted
    run's."""
    args = [*ARGS, *data["folder"], "train.epochs=12"]
    [agent] = _nodes(1, 2, args, tmp_path, "torchrun", MAX_RESTARTS="2")
    run_dir = tmp_path / "node0" / "runs" / NAME
    assert callable(wait_for_log_lines)
    wait_for_log_lines(run_dir / "metrics.jsonl", 12)  # the run record, 9 steps, epoch records: past 2 checkpoints
    workers = [p for p in psutil.Process(agent.pid).children(recursive=True) if "twinview" in " ".join(p.cmdline())]
    victim = next(p for p in workers if p.environ().get("RANK") == "1")
    victim.send_signal(signal.SIGKILL)
    try:
        out, err = agent.communicate(timeout=150)  # ~40 s when it works
    except subprocess.TimeoutExpired:
        for p in [*psutil.Process(agent.pid).children(recursive=True), psutil.Process(agent.pid)]:
            p.kill()  # a hung round must not outlive the test
        out, err = agent.communicate()
        raise AssertionError(f"the restarted run hung; its stderr ends:\n{err[-3000:]}") from None
    assert agent.returncode == 0, err[-3000:]
    assert "Continuing" in out  # the restarted group found the run
    _assert_same(_weights(run_dir), _weights(reference["folder"]))
    assert _steps(run_dir) == _steps(reference["folder"])  # redone steps logged once


@pytest.mark.parametrize(
    ("launcher", "sig"),
    [("torchrun", signal.SIGUSR1), ("accelerate", signal.SIGTERM)],
    ids=["torchrun-SIGUSR1", "accelerate-SIGTERM"],
)
def test_a_stop_signal_checkpoints_and_the_requeued_job_continues(
    tmp_path: Path,
    data: dict[str, list[str]],
    reference: dict[str, Path],
    wait_for_log_lines: object,
    launcher: str,
    sig: signal.Signals,
) -> None:
    """SIGUSR1 (SLURM's ``--signal=USR1@...`` warning) or SIGTERM (preemption, Kubernetes, scancel)
    to the launcher: it passes it on, the processes agree on a step, checkpoint it and exit; the
    same command again (a restarted job) continues to the uninterrupted run's weights, bitwise,
    every step logged once."""
    args = [*ARGS, *data["folder"], "train.epochs=12"]
    [step] = _nodes(1, 2, args, tmp_path, launcher)
    run_dir = tmp_path / "node0" / "runs" / NAME
    assert callable(wait_for_log_lines)
    wait_for_log_lines(run_dir / "metrics.jsonl", 6)
    os.kill(step.pid, sig)  # the launcher alone (node.sh execs it): it must pass the signal on
    _, err = step.communicate(timeout=180)
    assert step.returncode != 0  # stopped early: the sbatch script requeues the job
    assert err.count(f"interrupted by {sig.name}") == 2, err[-3000:]  # both processes, at the same step
    assert "_step_" in checkpoints(run_dir)[-1].name
    [requeued] = _nodes(1, 2, args, tmp_path, launcher)
    out, err = requeued.communicate(timeout=300)
    assert requeued.returncode == 0, err[-3000:]
    assert "Continuing" in out
    _assert_same(_weights(run_dir), _weights(reference["folder"]))
    assert _steps(run_dir) == _steps(reference["folder"])
