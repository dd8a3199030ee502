"""A restarted round of torchrun's training processes joins its process group through the store the
elastic agent kept from the round before (``distributed.join_process_group``).

The agent here is a ``TCPStore`` the test hosts, as torchrun's agent hosts one for the whole job; the
processes get the variables torchrun gives them. Round 0 leaves its keys in the store; in round 1
rank 0 comes late, so rank 1 finds round 0's keys first. Through torch's plain ``env://``
rendezvous it would read rank 0's dead address and fail to connect ("Connection refused", as
``tests/pretrain/test_multinode.py``'s kill -9 restart did); with the round's prefix it waits for
the new one. Rank 0 joins once rank 1 has written its own keys, so the order does not depend on
how fast the two processes start.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta

import pytest
import torch.distributed as dist

pytestmark = [
    pytest.mark.slow,  # four fresh interpreters
    pytest.mark.skipif(sys.platform == "win32", reason="gloo over TCP"),
]

WORKER = """
import os, time
from datetime import timedelta
import torch
import torch.distributed as dist
from twinview.pretrain.distributed import join_process_group, process_state
above = int(os.environ["TEST_WAIT_FOR_KEYS_ABOVE"])
if above >= 0:  # come late: once the other process has written its keys (or 20 s)
    agent = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timedelta(seconds=30))
    deadline = time.monotonic() + 20
    while agent.num_keys() <= above and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # and has read what it found
state = process_state(True)
x = torch.tensor([float(state.process_index + 1)])
dist.all_reduce(x)
print(state.num_processes, state.process_index, x.item(), flush=True)
dist.barrier()
dist.destroy_process_group()
# a second group in the same process (training, then an evaluation), rank 0 late again
time.sleep(2.0 if state.process_index == 0 else 0.0)
join_process_group(True)
y = torch.tensor([1.0])
dist.all_reduce(y)
print(int(y.item()), flush=True)
dist.destroy_process_group()
"""


EXPECTED = ["2 0 3.0\n2", "2 1 3.0\n2"]  # process count, rank, the sum of ranks + 1; then the second group's sum


def _round(port: int, restart: int, rank0_after_keys: int = -1) -> list[str]:
    """One round of 2 processes as torchrun's agent starts them; their printed lines. With
    ``rank0_after_keys`` >= 0, rank 0 joins only once the store holds more keys than that (rank 1's)."""
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": "2",
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": "2",
            "TORCHELASTIC_USE_AGENT_STORE": "True",
            "TORCHELASTIC_RESTART_COUNT": str(restart),
            "TEST_WAIT_FOR_KEYS_ABOVE": str(rank0_after_keys if rank == 0 else -1),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", WORKER], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    lines = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=90)
            assert proc.returncode == 0, err[-3000:]
            lines.append(out.strip())
    finally:
        for proc in procs:
            proc.kill()
    return lines


def test_a_restarted_round_joins_its_own_group_despite_the_last_rounds_keys() -> None:
    agent = dist.TCPStore("127.0.0.1", 0, None, is_master=True, timeout=timedelta(seconds=60), wait_for_workers=False)
    assert _round(agent.port, 0) == EXPECTED
    round0_keys = agent.num_keys()
    assert round0_keys > 0  # round 0's keys stay, as in the agent's store
    # rank 1 first: it must not read round 0's address of rank 0
    assert _round(agent.port, 1, rank0_after_keys=round0_keys) == EXPECTED
