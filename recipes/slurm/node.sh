#!/usr/bin/env bash
# One node's launch of a multi-node run: the SAME command on every node and on every requeue. srun starts it once
# per node (hera_2nodes.sbatch); it execs llamafactory-cli, which starts one rank per GPU on this node. Nothing in it
# changes between the first launch and a requeue: a run with checkpoints resumes from its newest whole one, a run
# stopped before step 1 continues from the rows its passes kept, a finished run says so and exits.
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
# exec: SIGUSR1 (--signal=USR1@N) then reaches llamafactory-cli itself, which ignores it and lets the ranks save
# shellcheck disable=SC2086  # EXTRA_KEYS is a list of KEY=VALUE words
exec llamafactory-cli train "$RECIPE" output_dir="$OUTPUT_DIR" ${EXTRA_KEYS:-}
