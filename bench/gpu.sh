#!/usr/bin/env bash
# The GPU figures (bench/README.md), on the lent GPU machine, from the repository root there, with .whl carried
# (bench/device_wheels.sh). Prints both benchmarks' tables; a log lands in $OUT when it is set.
#   overhead:  Qwen3-VL-8B architecture, random weights, bf16, LoRA on all linear layers, DINOv2-L teacher;
#              HeRA against SFT with LLaMA-Factory's defaults (reentrant checkpointing), as users run it; then
#              bench/cost.py's predicted peak memory of the same step (no GPU needed) beside the measured one
#              (BASELINE_NON_REENTRANT=1: SFT with use_reentrant_gc: false instead, --baseline-non-reentrant)
#   qlora:     the same as overhead, both arms QLoRA (quantization_bit 4: bitsandbytes nf4, double quantization),
#              against each other (not in "all")
#   selection: Qwen2.5-VL-7B architecture, N = 1000, DINOv2-L; plus `llamafactory-hera select` end to end
#   offload:   not a benchmark: HeRA's gather of an FSDP2 shard under CPU offload on the GPU (one rank, NCCL), the move of
#              the host shard to the GPU no CPU run takes (tests/hera/fsdp2_offload_gather.py, seconds; first in "all":
#              without the move in projection.whole it exits 1)
#   harc:      Llama-3.1-8B architecture, random weights, bf16, LoRA on all linear layers; HARC against SFT with
#              LLaMA-Factory's defaults (reentrant checkpointing), as users run it (HARC: its coupled layers only
#              non-reentrant)
#   step:      HeRA's optimizer step against SFT's in one lease (bench/step_ab.py): Qwen3-VL-8B architecture, the
#              arms resident at once and taking turns step by step; the shipped recipe's settings (micro-batch 16 x 8,
#              4 dataloader workers, logging every 10 steps) and the small step (8 x 1, no worker), each until its
#              ratio's 95 % interval is within +-1.5 %, then one profiled step of each arm; BUDGET seconds (480, the
#              asset build included; with this script's install, within 9 minutes); tables and traces in $OUT
#              (not in "all")
# Budget: ~17 GB of weights per preset are drawn on the GPU and written once (disk: 64 GB), then each
# overhead run loads them again (separate processes, so peak memory is per run).
set -euo pipefail
# The image's python3 is itself a venv (/opt/torch/.venv), so a venv on top of it would not see its torch:
# install into a target folder instead, put it first on PYTHONPATH (our transformers pin shadows the image's),
# and let a sitecustomize process its .pth files (the plugin activates through llamafactory_hera.pth).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
printf 'import site\nsite.addsitedir("/tmp/site")\n' > /tmp/site/sitecustomize.py
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 DISABLE_VERSION_CHECK=1
export PYTHONUNBUFFERED=1
PY=python3
$PY -c "import llamafactory_hera_patches.stage" || { echo "plugin not importable from /tmp/site"; exit 1; }
LOG=${OUT:-/tmp}/gpu_bench.log
ASSETS=${ASSETS:-/tmp/hera_bench_assets}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch, transformers, llamafactory; print(torch.__version__, transformers.__version__, llamafactory.__version__)"
  case "${1:-all}" in
    offload|all) $PY tests/hera/fsdp2_offload_gather.py --device cuda ;;&
    overhead|all) $PY bench/overhead.py --device cuda --preset qwen3-vl-8b --repeats "${REPEATS:-2}" --epochs 2 \
                    --images 128 --batch 8 --warmup 3 --assets "$ASSETS" \
                    ${BASELINE_NON_REENTRANT:+--baseline-non-reentrant}
                  # the counter's prediction for the same step (Qwen3-VL-8B, LoRA, batch 8, 448 px)
                  # beside the peak_gpu_mb (torch.cuda.max_memory_allocated) overhead.py printed above; every row
                  # counted COST_TOKENS long (default cutoff_len 1024, an upper bound of the overhead's rows)
                  echo "predicted by bench/cost.py (tensors only, no CUDA context) for overhead's step:"
                  $PY bench/cost.py --case 8b-lora --no-selection --detail --image-side 448 \
                    --set per_device_train_batch_size=8 --set cutoff_len="${COST_TOKENS:-1024}" ;;&
    step) $PY bench/step_ab.py --device cuda --preset qwen3-vl-8b --budget "${BUDGET:-480}" --assets "$ASSETS" \
            --out "${OUT:-/tmp/step_ab}" ;;
    qlora) $PY bench/overhead.py --device cuda --preset qwen3-vl-8b --repeats "${REPEATS:-2}" --epochs "${EPOCHS:-2}" \
                    --images 128 --batch 8 --warmup 3 --assets "$ASSETS" --quantization-bit 4 ;;
    selection|all) $PY bench/selection.py --device cuda --preset qwen2.5-vl-7b --samples 1000 --repeats 3 \
                    --batch 32 --end-to-end --assets "$ASSETS" ;;&
    # enable_liger_kernel (triton, GPU only) with HeRA and HARC against the same runs without it (it
    # needs liger-kernel and the test extra carried: pip install liger-kernel); not in "all"
    liger) $PY -m pytest tests/test_torch_compile.py -q -rs -k liger ;;
    harc|all) echo "HARC against SFT with LLaMA-Factory's defaults (reentrant gradient checkpointing), as users run it"
              $PY bench/harc.py --device cuda --preset llama3.1-8b --repeats "${REPEATS:-2}" --steps 12 \
                    --assets "${ASSETS}/harc" ;;
  esac
} 2>&1 | tee "$LOG"
