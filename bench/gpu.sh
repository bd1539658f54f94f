#!/usr/bin/env bash
# GPU figures of issue 7, on the lent GPU machine, from the repository root there, with .whl carried
# (bench/device_wheels.sh). Prints both benchmarks' tables; a log lands in $OUT when it is set.
#   overhead:  Qwen3-VL-8B architecture, random weights, bf16, LoRA on all linear layers, DINOv2-L teacher
#   selection: Qwen2.5-VL-7B architecture, N = 1000, DINOv2-L; plus `llamafactory-hera select` end to end
# Budget: ~17 GB of weights per preset are drawn on the GPU and written once (disk: 64 GB), then each
# overhead run loads them again (separate processes, so peak memory is per run).
set -euo pipefail
python3 -m venv --system-site-packages /tmp/hera-venv
/tmp/hera-venv/bin/python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .whl/*.whl
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 DISABLE_VERSION_CHECK=1 PYTHONUNBUFFERED=1
PY=/tmp/hera-venv/bin/python
LOG=${OUT:-/tmp}/gpu_bench.log
ASSETS=${ASSETS:-/tmp/hera_bench_assets}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch, transformers, llamafactory; print(torch.__version__, transformers.__version__, llamafactory.__version__)"
  case "${1:-all}" in
    overhead|all) $PY bench/overhead.py --device cuda --preset qwen3-vl-8b --repeats "${REPEATS:-2}" --epochs 2 \
                    --images 128 --batch 8 --warmup 3 --assets "$ASSETS" ;;&
    selection|all) $PY bench/selection.py --device cuda --preset qwen2.5-vl-7b --samples 1000 --repeats 3 \
                    --batch 32 --end-to-end --assets "$ASSETS" ;;
  esac
} 2>&1 | tee "$LOG"
