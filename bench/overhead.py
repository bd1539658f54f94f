"""HeRA's cost next to plain SFT: the same recipe as ``stage: sft`` and ``stage: hera``, interleaved A/B.
With ``--monitor``: the alignment monitor's cost, ``stage: hera`` with ``hera_monitor_steps: 0`` (A) against the
monitor's defaults (B), on the same recipe.

Every run is its own process (``llamafactory-cli``'s ``run_exp`` with a step timer), so peak
memory is per run. Step time is measured from one optimizer step's end to the next, so data
loading and the collator (where HeRA preprocesses the teacher's images) are included. The first
``--warmup`` steps of every run are dropped; the rest are split into the first epoch (the teacher
runs on every image) and later epochs (teacher features come from the cache).

Usage: python bench/overhead.py [--repeats 3] [--epochs 3] [--images 64] [--batch 8] [--device cpu]
       [--preset cpu-mid|qwen3-vl-8b|qwen2.5-vl-7b] [--monitor] [--quantization-bit 4|8]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from counters import print_monitor_counters, thread_counters
from runs import BENCH, gpu_peaks, print_result, run_worker, step_timer


def recipe(assets, stage: str, output_dir: str, args: argparse.Namespace) -> dict:
    """The benchmark recipe: LoRA on all linear layers, 5 heads spread over the depth, k=7 (``--hera-k``),
    lambda=0.01.

    ``stage``: ``sft``, ``hera`` (the monitor at its defaults) or ``hera_off`` (``hera_monitor_steps: 0``).
    """
    return {
        "model_name_or_path": str(assets.model), "stage": "sft" if stage == "sft" else "hera", "do_train": True,
        "finetuning_type": "lora",
        "lora_target": "all", "lora_rank": 8, "dataset": "hera_demo", "dataset_dir": str(assets.dataset_dir),
        "template": assets.template, "cutoff_len": assets.preset.cutoff_len, "overwrite_cache": True,
        "preprocessing_num_workers": 1, "dataloader_num_workers": 0, "per_device_train_batch_size": args.batch,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1e-4, "num_train_epochs": args.epochs, "lr_scheduler_type": "constant", "logging_steps": 1,
        "save_strategy": "no", "output_dir": output_dir, "overwrite_output_dir": True, "report_to": "none",
        "seed": 0, "bf16": args.device != "cpu", "disable_tqdm": True,
        "hera_heads": assets.hera_heads(), "hera_teacher": str(assets.teacher), "hera_k": args.hera_k,
        "hera_teacher_precompute": args.precompute,
        **({"hera_monitor_steps": 0} if stage == "hera_off" or (stage == "hera" and not args.monitor) else {}),
        **({"hera_monitor_steps": args.monitor_steps} if stage == "hera" and args.monitor_steps is not None else {}),
        **({"use_reentrant_gc": False} if args.baseline_non_reentrant else {}),
        # QLoRA as LLaMA-Factory's examples/train_qlora runs it: bitsandbytes at load, nf4 with double quantization
        # (LLaMA-Factory's defaults for the other keys), the same in both arms
        **({"quantization_bit": args.quantization_bit, "quantization_method": "bnb"} if args.quantization_bit else {}),
    }


def baseline_line(non_reentrant: bool) -> str:
    """What the SFT runs are, said with the table (HeRA's ratio depends on it)."""
    if non_reentrant:
        return ("SFT with use_reentrant_gc: false (--baseline-non-reentrant: non-reentrant gradient checkpointing in "
                "every layer, not LLaMA-Factory's default)")
    return ("SFT with LLaMA-Factory's defaults, as users run it (reentrant gradient checkpointing in every layer; "
            "HeRA runs the layers of its heads non-reentrant)")


def time_calls(owner: type, name: str) -> list[float]:
    """Replace method ``name`` of ``owner`` by one that also appends each call's seconds to the returned list."""
    original = getattr(owner, name)
    seconds: list[float] = []

    def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        result = original(self, *args, **kwargs)
        seconds.append(time.perf_counter() - start)
        return result

    setattr(owner, name, timed)
    return seconds


def worker(args: argparse.Namespace) -> None:
    """One run in this process; prints a JSON line with step end times and peak memory."""
    import resource

    import torch
    from assets import build_bench_assets
    from llamafactory.train.tuner import run_exp
    from transformers import TrainerCallback

    class StepMemory(TrainerCallback):
        """CPU runs: peak bytes of tensors allocated during one step (torch profiler), from the step's start.

        The CPU's RSS also moves with the C allocator's caching; this counts tensors only, like
        ``torch.cuda.max_memory_allocated`` does on a GPU (minus what was live before the step).
        """

        def __init__(self, step: int) -> None:
            self.step, self.profiler, self.peak_mb = step, None, None

        def on_step_begin(self, args, state, control, **kwargs) -> None:
            if state.global_step == self.step:
                self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                       profile_memory=True)
                self.profiler.__enter__()

        def on_step_end(self, args, state, control, **kwargs) -> None:
            if self.profiler is None:
                return
            self.profiler.__exit__(None, None, None)
            deltas = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in self.profiler.events()
                            if e.self_cpu_memory_usage)
            live = peak = 0
            for _, delta in deltas:
                live += delta
                peak = max(peak, live)
            self.peak_mb, self.profiler = peak / 2**20, None

    from llamafactory_hera.hera.monitor import MonitorCallback
    from llamafactory_hera.hera.teacher_run import RunTeacher

    # the teacher pass before the first step, if any; the probe pairs' teacher features, once, before step 1; each
    # monitor point (the probe forward and the scoring, synced)
    precompute_seconds = time_calls(RunTeacher, "precompute")
    monitor_prepare = time_calls(MonitorCallback, "prepare_teacher")
    monitor_points = time_calls(MonitorCallback, "point")

    class MonitorPoints(TrainerCallback):
        def __init__(self) -> None:
            self.steps: list[int] = []

        def on_log(self, args, state, control, logs=None, **kwargs) -> None:
            if logs and "hera_mknn" in logs:
                self.steps.append(state.global_step)

    class QuantizedLinears(TrainerCallback):
        """Evidence that QLoRA engaged: the bitsandbytes linear layers under the trained model."""

        count = 0

        def on_train_begin(self, args, state, control, model=None, **kwargs) -> None:
            # bitsandbytes' own layers (PEFT's LoRA wrappers of them share the class names, not the module)
            self.count = sum(type(m).__module__.startswith("bitsandbytes") for m in model.modules())

    points, quantized = MonitorPoints(), QuantizedLinears()
    assets = build_bench_assets(Path(args.assets), num_images=args.images, preset=args.preset)
    if not args.counters:
        counters, unavailable = None, "not asked for (--counters)"
    elif args.device != "cpu":  # the driver's spin-wait in each synchronize would count as the thread's work
        counters, unavailable = None, f"CPU runs only (--device {args.device})"
    else:
        counters, unavailable = thread_counters()
    timer = step_timer(counters)
    memory = StepMemory(args.warmup + 1)
    with tempfile.TemporaryDirectory() as out:
        run_exp(recipe(assets, args.worker, out, args),
                callbacks=[timer, points, quantized] + ([memory] if args.step_tensors else []))
    steps = [b - a for a, b in zip(timer.ends, timer.ends[1:], strict=False)]
    if memory.peak_mb is not None:  # the profiled step is slower: leave it out of the timings
        steps[memory.step] = float("nan")
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print_result({"stage": args.worker, "steps": steps, "train_s": timer.end - timer.ends[0],
                  "monitor_prepare_s": sum(monitor_prepare), "monitor_steps": points.steps,
                  "monitor_points_s": monitor_points, "precompute_s": sum(precompute_seconds),
                  "step_tensors_mb": memory.peak_mb, "peak_rss_mb": peak_rss, **gpu_peaks(timer),
                  "counts": timer.counts, "end_count": timer.end_count, "counters_unavailable": unavailable,
                  "torch_threads": torch.get_num_threads(),
                  "quantized_linears": quantized.count})


def run_one(stage: str, args: argparse.Namespace) -> dict:
    options = ["--assets", args.assets, "--epochs", str(args.epochs), "--images", str(args.images), "--batch",
               str(args.batch), "--device", args.device, "--preset", args.preset, "--precompute", args.precompute,
               "--warmup", str(args.warmup), "--hera-k", str(args.hera_k)]
    if args.step_tensors:
        options.append("--step-tensors")
    if args.baseline_non_reentrant:
        options.append("--baseline-non-reentrant")
    if args.monitor:
        options.append("--monitor")
    if args.counters:
        options.append("--counters")
    if args.monitor_steps is not None:
        options += ["--monitor-steps", str(args.monitor_steps)]
    if args.quantization_bit:
        options += ["--quantization-bit", str(args.quantization_bit)]
    return run_worker(str(Path(__file__)), stage, args.device, options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--hera-k", type=int, default=7,
                        help="hera_k of the HeRA runs (7; at a batch of k or fewer images HeRA adds its queue of "
                             "earlier rows, docs/hera.md)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default="cpu-mid", help="model and teacher architecture (bench/assets.py PRESETS); "
                        "GPU: qwen3-vl-8b")
    parser.add_argument("--precompute", default="auto", choices=["auto", "true", "false"],
                        help="hera_teacher_precompute of the HeRA runs (auto: on, since the runs cover whole epochs)")
    parser.add_argument("--step-tensors", action="store_true",
                        help="CPU: profile one step's peak tensor bytes (torch profiler; the profiler's own memory "
                             "then shows in the peak RSS, and that step is left out of the timings)")
    parser.add_argument("--baseline-non-reentrant", action="store_true",
                        help="give the SFT runs non-reentrant gradient checkpointing in every layer "
                             "(use_reentrant_gc: false) instead of LLaMA-Factory's default (reentrant), to separate "
                             "the checkpointing mode's cost from HeRA's (HeRA runs its heads' layers non-reentrant)")
    parser.add_argument("--monitor", action="store_true",
                        help="compare HeRA with the alignment monitor off (hera_monitor_steps: 0, A) and at its "
                             "defaults (B) instead of SFT (A) and HeRA (B, monitor off)")
    parser.add_argument("--monitor-steps", type=int,
                        help="with --monitor: hera_monitor_steps of the monitored runs (default: the monitor's "
                             "default, with logging_steps within its 5 %% budget)")
    parser.add_argument("--counters", action="store_true",
                        help="also count the instructions and cycles the training thread retires (Linux hardware "
                             "counters, bench/counters.py): the work of each run, which the machine's load does not "
                             "move; set OMP_NUM_THREADS=1 so that the training runs on that thread")
    parser.add_argument("--quantization-bit", type=int, choices=[4, 8],
                        help="QLoRA in both arms: quantization_bit of the recipe (bitsandbytes; 4: nf4 with double "
                             "quantization, LLaMA-Factory's defaults)")
    parser.add_argument("--assets", default=str(Path(tempfile.gettempdir()) / "hera_bench_assets"))
    parser.add_argument("--save", help="also write every run's measurements (step times, points) to this JSON file")
    parser.add_argument("--worker", choices=["sft", "hera", "hera_off"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.monitor_steps is not None and not args.monitor:
        parser.error("--monitor-steps: only with --monitor")
    for key, least in (("repeats", 1), ("epochs", 1), ("images", 1), ("batch", 1), ("warmup", 0)):
        if getattr(args, key) < least:  # each run's table needs one measured step of each stage
            parser.error(f"--{key} {getattr(args, key)}: must be at least {least}")
    if args.worker:
        return worker(args)
    sys.path.insert(0, str(BENCH))
    from assets import build_bench_assets

    assets = build_bench_assets(Path(args.assets), num_images=args.images, preset=args.preset)
    print(f"preset {args.preset}: model {assets.model}, teacher {assets.teacher}, heads {assets.hera_heads()}",
          flush=True)
    if not args.monitor:
        print(f"baseline: {baseline_line(args.baseline_non_reentrant)}", flush=True)
    if args.quantization_bit:
        print(f"both arms QLoRA: quantization_bit {args.quantization_bit} (bitsandbytes)", flush=True)
    per_epoch = -(-args.images // args.batch)
    base, other = ("hera_off", "hera") if args.monitor else ("sft", "hera")
    results: dict[str, list[dict]] = {base: [], other: []}

    def steps_of(run: dict, part: str) -> list[float]:
        series = run["steps"]
        chosen = {"first": series[args.warmup:per_epoch], "later": series[per_epoch:],
                  "all": series[args.warmup:]}[part]
        return [value for value in chosen if value == value]  # NaN: the step profiled for memory

    for repeat in range(args.repeats):
        for stage in ((base, other), (other, base))[repeat % 2]:  # ABBA...: order effects cancel
            results[stage].append(run_one(stage, args))
            if args.quantization_bit and not results[stage][-1]["quantized_linears"]:
                raise SystemExit(f"{stage}: --quantization-bit {args.quantization_bit}, but the trained model has no "
                                 "bitsandbytes linear layer")
            print(f"repeat {repeat + 1}/{args.repeats} {stage}: median step "
                  f"{statistics.median(steps_of(results[stage][-1], 'all')) * 1e3:.1f} ms, training "
                  f"{results[stage][-1]['train_s']:.2f} s"
                  + (f", {results[stage][-1]['quantized_linears']} bitsandbytes linears" if args.quantization_bit
                     else ""), flush=True)

    if args.save:
        import json

        Path(args.save).write_text(json.dumps(results, indent=1))

    def median_of(stage: str, part: str) -> float:
        return statistics.median(s for run in results[stage] for s in steps_of(run, part))

    threads = results[base][0]["torch_threads"]  # the workers': this process imports no torch
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
          f"{threads}, device {args.device}; {args.repeats} repeats (A/B interleaved, ABBA order), "
          f"{args.epochs} epochs x {per_epoch} steps, batch {args.batch}, warm-up {args.warmup} steps dropped")
    print(f"{'':26}{base:>10}{other:>10}{'ratio':>8}   per A/B pair (median, range)")
    for part, label in (("first", "first epoch"), ("later", "later epochs"), ("all", "all")):
        if not all(steps_of(run, part) for run in (*results[base], *results[other])):
            print(f"{f'step, {label} (ms)':26}no steps (--epochs {args.epochs}, --warmup {args.warmup})")
            continue
        a, b = median_of(base, part), median_of(other, part)
        pairs = sorted(statistics.median(steps_of(h, part)) / statistics.median(steps_of(s, part))
                       for s, h in zip(results[base], results[other], strict=True))
        print(f"{f'step, {label} (ms)':26}{a * 1e3:10.1f}{b * 1e3:10.1f}{b / a:8.3f}   "
              f"{statistics.median(pairs):.3f} ({pairs[0]:.3f}-{pairs[-1]:.3f})")
    if args.monitor:
        _print_monitor(results[base], results[other])
        print_monitor_counters(results[base], results[other])
    pre = statistics.median(run["precompute_s"] for run in results["hera"])
    if pre > 0 and not args.monitor:
        a, b = median_of("sft", "first"), median_of("hera", "first")
        print(f"{'teacher pass before step 1':26}{'':10}{pre * 1e3:10.1f}   ms per run (hera_teacher_precompute)")
        print(f"{'first epoch incl. the pass':26}{a * per_epoch:10.1f}{b * per_epoch + pre:10.1f}"
              f"{(b * per_epoch + pre) / (a * per_epoch):8.3f}   s, step medians x {per_epoch} steps")
    for key, label in (("step_tensors_mb", "step tensors, peak (MiB)"), ("peak_rss_mb", "peak RSS (MiB)"),
                       ("peak_gpu_mb", "peak GPU mem, training (MiB)"),
                       ("peak_gpu_process_mb", "peak GPU mem, process (MiB)")):
        if results[base][0][key] is None:
            continue
        a = max(r[key] for r in results[base])
        b = max(r[key] for r in results[other])
        print(f"{label:26}{a:10.1f}{b:10.1f}{b / a:8.3f}")


def _print_monitor(off: list[dict], on: list[dict]) -> None:
    """The monitor's cost: whole training time (train begin to train end, so the point at step 0 and every later
    point, the last step's included, are in it), without and with the probe pairs' teacher pass before step 1."""
    train_off = statistics.median(run["train_s"] for run in off)
    train_on = statistics.median(run["train_s"] for run in on)
    prepare = statistics.median(run["monitor_prepare_s"] for run in on)
    pairs = sorted(b["train_s"] / a["train_s"] for a, b in zip(off, on, strict=True))
    print(f"{'training time (s)':26}{train_off:10.2f}{train_on:10.2f}{train_on / train_off:8.3f}   "
          f"{statistics.median(pairs):.3f} ({pairs[0]:.3f}-{pairs[-1]:.3f})")
    print(f"{'+ probe teacher pass (s)':26}{train_off:10.2f}{train_on + prepare:10.2f}"
          f"{(train_on + prepare) / train_off:8.3f}   teacher features of the probe pairs: {prepare * 1e3:.1f} ms")
    for run in on:  # measured inside the run itself: robust to the machine's load changing between runs
        spent = sum(run["monitor_points_s"])
        print(f"{'monitor, in its own run':26}points at steps {run['monitor_steps']}, {spent:.2f} s "
              f"({', '.join(f'{t * 1e3:.0f}' for t in run['monitor_points_s'])} ms) = "
              f"{100 * spent / (run['train_s'] - spent):.1f} % of its training time; with the teacher pass "
              f"{100 * (spent + run['monitor_prepare_s']) / (run['train_s'] - spent):.1f} %")


if __name__ == "__main__":
    main()
