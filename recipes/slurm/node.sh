#!/usr/bin/env bash
# One node's launch of a multi-node run: the SAME command on every node and on every requeue. srun starts it once
# per node (recipes/slurm/job.sh); it execs llamafactory-cli (DDP), or with ACCELERATE_CONFIG accelerate launch
# (FSDP2: qwen2_5_72b_hera_fsdp2_2nodes.sbatch), which starts one rank per GPU on this node. Nothing in it changes
# between the first launch and a requeue: a run with checkpoints resumes from its newest whole one, a run stopped
# before step 1 continues from the rows its passes kept, a finished run says so and exits.
set -euo pipefail
: "${RECIPE:?set RECIPE to the recipe file}" "${OUTPUT_DIR:?set OUTPUT_DIR to a folder on the shared file system}"
: "${MASTER_ADDR:?set MASTER_ADDR to the first node}" "${MASTER_PORT:=29571}"
# node-local scratch: this node's temporary files (TorchInductor's compile cache follows TMPDIR) and Triton's kernel
# cache, which would otherwise sit in HOME, written by every node at once when HOME is shared
export TMPDIR="${NODE_SCRATCH:-/tmp}/llamafactory-hera-${SLURM_JOB_ID:-job}"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$TMPDIR/triton}"
mkdir -p "$TMPDIR"
export FORCE_TORCHRUN=1 NNODES="${SLURM_NNODES:?}" NODE_RANK="${SLURM_NODEID:?}" NPROC_PER_NODE="${GPUS_PER_NODE:-8}"
export MASTER_ADDR MASTER_PORT
# exec: the job's signals then reach the launcher itself, which ignores the warning signals (SIGUSR1, SIGUSR2) and
# outlives a SIGTERM while its ranks save (SLURM ends the step's processes once this task ends)
if [ -n "${ACCELERATE_CONFIG:-}" ]; then
  # the config's one node made this job's: its node count, this node's rank, every node's ranks, the first node
  # shellcheck disable=SC2086  # ACCELERATE_ARGS and EXTRA_KEYS are lists of words
  exec accelerate launch --config_file "$ACCELERATE_CONFIG" --num_machines "$NNODES" --machine_rank "$NODE_RANK" \
    --num_processes "$((NNODES * NPROC_PER_NODE))" --main_process_ip "$MASTER_ADDR" \
    --main_process_port "$MASTER_PORT" ${ACCELERATE_ARGS:-} -m llamafactory.launcher "$RECIPE" \
    output_dir="$OUTPUT_DIR" ${EXTRA_KEYS:-}
fi
# shellcheck disable=SC2086  # EXTRA_KEYS is a list of KEY=VALUE words
exec llamafactory-cli train "$RECIPE" output_dir="$OUTPUT_DIR" ${EXTRA_KEYS:-}
