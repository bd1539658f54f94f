#!/usr/bin/env bash
# The body of a two-node SLURM job (docs/multinode.md), run by hera_2nodes.sbatch and
# qwen2_5_72b_hera_fsdp2_2nodes.sbatch with RECIPE, OUTPUT_DIR and JOB_SCRIPT (the sbatch script itself) set: node.sh
# once per node with srun, then the job back in the queue unless the run's record says finished.
set -euo pipefail
: "${RECIPE:?set RECIPE to the recipe file}" "${OUTPUT_DIR:?set OUTPUT_DIR to a folder on the shared file system}"
: "${JOB_SCRIPT:?set JOB_SCRIPT to the sbatch script}"
# the first line by sed, which reads the rest too: `head -n 1` closes the pipe early, and under pipefail the writer's
# SIGPIPE (exit 141) ended the job script
MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)"
gpus="${SLURM_GPUS_PER_NODE:-8}"   # "8", or "h100:8" when --gpus-per-node names a type: the count after the last colon
export MASTER_ADDR MASTER_PORT="${MASTER_PORT:-29571}" GPUS_PER_NODE="${gpus##*:}"
# the ranks save on the signal the job asks SLURM for (the sbatch's --signal line: USR1 -> sigusr1; without one a
# preemption's SIGTERM, whose grace time must then hold the stop); SAVE_SIGNAL naming another is refused here, since
# the ranks would not save on the job's signal
job_signal="$(sed -n 's/^#SBATCH --signal=\(SIG\)\{0,1\}\([A-Z0-9]*\)@.*/\2/p' "$JOB_SCRIPT" | sed -n 1p)"
wanted="sig$(printf '%s' "${job_signal:-TERM}" | tr '[:upper:]' '[:lower:]')"
export SAVE_SIGNAL="${SAVE_SIGNAL:-$wanted}"
if [ "$SAVE_SIGNAL" != "$wanted" ]; then
  echo "[llamafactory-hera] error: SAVE_SIGNAL=$SAVE_SIGNAL, but this job asks SLURM for SIG${job_signal:-TERM}" \
    "($JOB_SCRIPT's --signal line): the ranks would not save on it. Set SAVE_SIGNAL=$wanted, or change that line." >&2
  exit 1
fi
# the recipe's stage names the key (hera_save_on_signal, harc_save_on_signal); EXTRA_KEYS after it, never instead
stage="$(sed -n 's/^stage: *\([a-z]*\).*/\1/p' "$RECIPE" | sed -n 1p)"
export EXTRA_KEYS="${stage}_save_on_signal=${SAVE_SIGNAL}${EXTRA_KEYS:+ $EXTRA_KEYS}"
status=0
# --cpus-per-task again: not every SLURM's srun takes it from sbatch's (22.05 stopped reading SLURM_CPUS_PER_TASK),
# and the node's launcher, its ranks and their data workers would then share one CPU
srun --kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-32}" bash recipes/slurm/node.sh || status=$?
# finished: the run's record says so. Stopped on the signal (exit 0): back in the queue. Ended by a lost node or another
# failure: back in the queue while fewer than MAX_FAILURES starts in a row failed (a recipe mistake fails every start)
if grep -q '"status": "finished"' "$OUTPUT_DIR/llamafactory_hera_run.json" 2>/dev/null; then
  exit 0
fi
failures="${SLURM_SUBMIT_DIR:-.}/slurm-${SLURM_JOB_ID}.failures"   # beside the log, not in output_dir
if [ "$status" -eq 0 ]; then
  rm -f "$failures"
else
  echo $(( $(cat "$failures" 2>/dev/null || echo 0) + 1 )) > "$failures"
fi
if [ "$status" -eq 0 ] || [ "$(cat "$failures")" -lt "${MAX_FAILURES:-3}" ]; then
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
