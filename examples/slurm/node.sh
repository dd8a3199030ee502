#!/bin/bash
# One node's launcher for `twinview pretrain` on several machines: examples/slurm/pretrain.sbatch runs
# it once per node through srun; elsewhere (Kubernetes, machines by hand) run it on every machine
# with the variables below set (docs/SCALE.md).
# tests/pretrain/test_multinode.py runs this file, unchanged, as two nodes on one machine.
#
#   NNODES           number of machines                      (under SLURM: SLURM_NNODES, which wins)
#   NODE_RANK        this machine's index, 0 .. NNODES-1     (under SLURM: SLURM_NODEID, which wins)
#   MAIN_ADDR        address of machine 0, reachable from all (the sbatch script sets it)
#   PROCS_PER_NODE   training processes per machine          (default: SLURM_GPUS_ON_NODE, else the GPUs nvidia-smi lists)
#   MAIN_PORT        a free TCP port on machine 0            (default 29500)
#   LAUNCHER         accelerate (default) or torchrun
#   MAX_RESTARTS     restarts of the whole group after a process dies (default 0)
#   SHUTDOWN_TIMEOUT seconds the launcher gives its processes to checkpoint after a stop signal
#                    before it kills them (default 100: under SLURM's 120 s warning)
#
# Arguments: what `twinview pretrain` takes (a recipe, overrides). `--resume auto` is added, so the
# same command starts the run and, after a restart or a requeue, continues it; it needs
# train.run_name, and train.output_dir on a disk every machine sees (docs/SCALE.md).
set -euo pipefail
if [ -n "${SLURM_NODEID:-}" ]; then  # under SLURM its values win over ones left in the environment
  NODES=$SLURM_NNODES
  NODE=$SLURM_NODEID
else
  NODES=${NNODES:?set NNODES}
  NODE=${NODE_RANK:?set NODE_RANK}
fi
PROCS=${PROCS_PER_NODE:-${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}}
PORT=${MAIN_PORT:-29500}
: "${MAIN_ADDR:?set MAIN_ADDR}"

# Both launchers run torchrun's elastic agent, which reads its settings from PET_* variables: it
# passes these signals on to the training processes (SIGUSR1 is SLURM's warning before the time
# limit; torch 2.14 has this setting, older ones ignore it), which checkpoint and exit, and it waits
# SHUTDOWN_TIMEOUT seconds for them (its default is 30) before it kills them.
export PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
export PET_SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-100}
# With torchrun's elastic c10d rendezvous (--rdzv-backend c10d, not used below) a restarted round gets a
# fresh store of its own instead of the last round's keys (twinview.pretrain.distributed.join_process_group).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1

if [ "${LAUNCHER:-accelerate}" = torchrun ]; then
  exec torchrun --nnodes "$NODES" --node_rank "$NODE" --nproc_per_node "$PROCS" \
    --master_addr "$MAIN_ADDR" --master_port "$PORT" --max-restarts "${MAX_RESTARTS:-0}" \
    -m twinview.pretrain.app.cli pretrain --resume auto "$@"
fi
exec accelerate launch --multi_gpu --num_machines "$NODES" --machine_rank "$NODE" \
  --num_processes $((NODES * PROCS)) --main_process_ip "$MAIN_ADDR" --main_process_port "$PORT" \
  --max_restarts "${MAX_RESTARTS:-0}" --mixed_precision no --dynamo_backend no \
  -m twinview.pretrain.app.cli pretrain --resume auto "$@"
