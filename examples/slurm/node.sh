#!/bin/bash
# One node's launcher for `twinview pretrain` on several machines: examples/slurm/pretrain.sbatch runs
# it once per node through srun; elsewhere (Kubernetes, machines by hand) run it on every machine
# with the variables below set (docs/SCALE.md).
# tests/pretrain/test_multinode.py runs this file, unchanged, as two nodes on one machine.
#
#   NNODES           number of machines                      (under SLURM: SLURM_NNODES)
#   NODE_RANK        this machine's index, 0 .. NNODES-1     (under SLURM: SLURM_NODEID)
#   MAIN_ADDR        address of machine 0, reachable from all (the sbatch script sets it)
#   PROCS_PER_NODE   training processes per machine          (default: SLURM_GPUS_ON_NODE, else the GPUs nvidia-smi lists)
#   MAIN_PORT        a free TCP port on machine 0            (default 29500)
#   LAUNCHER         accelerate (default) or torchrun
#   MAX_RESTARTS     torchrun only: restarts of the whole group after a process dies (default 0)
#
# Arguments: what `twinview pretrain` takes (a recipe, overrides). `--resume auto` is added, so the
# same command starts the run and, after a restart or a requeue, continues it; it needs
# train.run_name, and train.output_dir on a disk every machine sees (docs/SCALE.md).
set -uo pipefail
NODES=${NNODES:-${SLURM_NNODES:?set NNODES}}
NODE=${NODE_RANK:-${SLURM_NODEID:?set NODE_RANK}}
PROCS=${PROCS_PER_NODE:-${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}}
PORT=${MAIN_PORT:-29500}
: "${MAIN_ADDR:?set MAIN_ADDR}"

if [ "${LAUNCHER:-accelerate}" = torchrun ]; then
  # --signals-to-handle: the agent passes SIGUSR1 (SLURM's warning before the time limit) on to the
  # training processes, which checkpoint and exit, and it then ends instead of restarting them.
  exec torchrun --nnodes "$NODES" --node_rank "$NODE" --nproc_per_node "$PROCS" \
    --master_addr "$MAIN_ADDR" --master_port "$PORT" --max-restarts "${MAX_RESTARTS:-0}" \
    --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
    -m twinview.pretrain.app.cli pretrain --resume auto "$@"
fi

# accelerate launch has no such option and would die of SIGUSR1, so it starts with the signal
# ignored and this script passes it on to its training processes; SIGTERM goes to the launcher,
# which passes it on itself (this script may be PID 1 in a container, deaf to an untrapped SIGTERM).
(trap '' USR1; exec accelerate launch --multi_gpu --num_machines "$NODES" --machine_rank "$NODE" \
  --num_processes $((NODES * PROCS)) --main_process_ip "$MAIN_ADDR" --main_process_port "$PORT" \
  --mixed_precision no --dynamo_backend no \
  -m twinview.pretrain.app.cli pretrain --resume auto "$@") &
launcher=$!
trap 'pkill -USR1 -P "$launcher"' USR1
trap 'kill -TERM "$launcher"' TERM
while true; do
  wait "$launcher"
  status=$?
  kill -0 "$launcher" 2>/dev/null || break  # still running: the wait was cut short by the trap
done
exit "$status"
