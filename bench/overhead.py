"""HeRA's cost next to plain SFT: the same recipe as ``stage: sft`` and ``stage: hera``, interleaved A/B.

Every run is its own process (``llamafactory-cli``'s ``run_exp`` with a step timer), so peak
memory is per run. Step time is measured from one optimizer step's end to the next, so data
loading and the collator (where HeRA preprocesses the teacher's images) are included. The first
``--warmup`` steps of every run are dropped; the rest are split into the first epoch (the teacher
runs on every image) and later epochs (teacher features come from the cache).

Usage: python bench/overhead.py [--repeats 3] [--epochs 3] [--images 64] [--batch 8] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "DISABLE_VERSION_CHECK": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_DISABLED": "true"}


def recipe(assets, stage: str, output_dir: str, args: argparse.Namespace) -> dict:
    """The benchmark recipe: LoRA on all linear layers, HeRA paper defaults (5 heads, k=10, lambda=0.01)."""
    return {
        "model_name_or_path": str(assets.model), "stage": stage, "do_train": True, "finetuning_type": "lora",
        "lora_target": "all", "lora_rank": 8, "dataset": "hera_demo", "dataset_dir": str(assets.dataset_dir),
        "template": assets.template, "cutoff_len": 256, "overwrite_cache": True, "preprocessing_num_workers": 1,
        "dataloader_num_workers": 0, "per_device_train_batch_size": args.batch, "gradient_accumulation_steps": 1,
        "learning_rate": 1e-4, "num_train_epochs": args.epochs, "lr_scheduler_type": "constant", "logging_steps": 1,
        "save_strategy": "no", "output_dir": output_dir, "overwrite_output_dir": True, "report_to": "none",
        "seed": 0, "bf16": args.device != "cpu", "disable_tqdm": True,
        "hera_heads": ["L7H1", "L3H5", "L2H2", "L7H7", "L5H0"], "hera_teacher": str(assets.teacher), "hera_k": 7,
    }


def worker(args: argparse.Namespace) -> None:
    """One run in this process; prints a JSON line with step end times and peak memory."""
    import resource

    import torch
    from assets import build_bench_assets
    from llamafactory.train.tuner import run_exp
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_train_begin(self, *a, **k) -> None:
            self.ends.append(time.perf_counter())

        def on_step_end(self, *a, **k) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

    assets = build_bench_assets(Path(args.assets))
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        run_exp(recipe(assets, args.worker, out, args), callbacks=[timer])
    steps = [b - a for a, b in zip(timer.ends, timer.ends[1:], strict=False)]
    peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("BENCH " + json.dumps({"stage": args.worker, "steps": steps, "peak_rss_mb": peak_rss,
                                 "peak_gpu_mb": peak_gpu}), flush=True)


def run_one(stage: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(Path(__file__)), "--worker", stage, "--assets", args.assets, "--epochs",
           str(args.epochs), "--images", str(args.images), "--batch", str(args.batch), "--device", args.device]
    env = {**os.environ, **OFFLINE, "PYTHONPATH": str(BENCH)}
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("BENCH ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{stage} run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("BENCH "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--assets", default=str(Path(tempfile.gettempdir()) / "hera_bench_assets"))
    parser.add_argument("--worker", choices=["sft", "hera"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    sys.path.insert(0, str(BENCH))
    from assets import build_bench_assets

    build_bench_assets(Path(args.assets), num_images=args.images)
    per_epoch = -(-args.images // args.batch)
    results: dict[str, list[dict]] = {"sft": [], "hera": []}
    for repeat in range(args.repeats):
        for stage in ("sft", "hera"):  # ABAB...
            results[stage].append(run_one(stage, args))
            print(f"repeat {repeat + 1}/{args.repeats} {stage}: median step "
                  f"{statistics.median(results[stage][-1]['steps'][args.warmup:]) * 1e3:.1f} ms", flush=True)

    def median_of(stage: str, first_epoch: bool) -> float:
        values = []
        for run in results[stage]:
            steps = run["steps"][args.warmup:per_epoch] if first_epoch else run["steps"][per_epoch:]
            values.extend(steps)
        return statistics.median(values)

    import torch

    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}, device {args.device}; {args.repeats} repeats (A/B interleaved), "
          f"{args.epochs} epochs x {per_epoch} steps, batch {args.batch}, warm-up {args.warmup} steps dropped")
    print(f"{'':22}{'sft':>10}{'hera':>10}{'ratio':>8}")
    for label, first in (("step, first epoch", True), ("step, later epochs", False)):
        a, b = median_of("sft", first), median_of("hera", first)
        print(f"{label + ' (ms)':22}{a * 1e3:10.1f}{b * 1e3:10.1f}{b / a:8.3f}")
    all_a = statistics.median([s for r in results["sft"] for s in r["steps"][args.warmup:]])
    all_b = statistics.median([s for r in results["hera"] for s in r["steps"][args.warmup:]])
    print(f"{'step, all (ms)':22}{all_a * 1e3:10.1f}{all_b * 1e3:10.1f}{all_b / all_a:8.3f}")
    for key, label in (("peak_rss_mb", "peak RSS (MiB)"), ("peak_gpu_mb", "peak GPU mem (MiB)")):
        if results["sft"][0][key] is None:
            continue
        a = max(r[key] for r in results["sft"])
        b = max(r[key] for r in results["hera"])
        print(f"{label:22}{a:10.1f}{b:10.1f}{b / a:8.3f}")


if __name__ == "__main__":
    main()
