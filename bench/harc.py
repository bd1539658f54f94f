"""HARC's cost next to plain SFT: ``stage: harc`` and ``stage: sft`` with the same model, LoRA, batch and steps.

Both stages train the same LoRA (all linear layers) on the same model with micro-batches of 12 rows and gradient
accumulation 2, with LLaMA-Factory's default gradient checkpointing (reentrant in every layer, under HARC too):
SFT on the three role datasets mixed (``per_device_train_batch_size: 12``), HARC on its composed
6 + 4 + 2 micro-batches. Every run is its own process (``run_exp`` with a step timer), A/B interleaved in ABBA
order; the first ``--warmup`` steps of each run are dropped. Reported:

- step time: medians of the step-to-step times of the steps without a refresh (the refreshes are reported apart);
- peak memory: peak RSS per process on CPU, ``torch.cuda.max_memory_allocated`` over the training on a GPU (from train
  begin: runs.py ``gpu_peaks``);
- refresh cost at the reference's settings: one refresh (directions on 300 + 300 prompts, the response side on
  3 x 300 answers, validation on 100 + 100 prompts: ``--extract`` / ``--validate``) timed inside the HARC runs,
  amortised over the reference's 100 optimizer steps between refreshes: refresh / (refresh + 100 x step).

Targets: step-time ratio <= 1.6 (HARC adds an adapter-disabled forward on the retain rows), memory ratio <= 1.1
(one model copy), refresh <= 10 % of training time.

Usage: python bench/harc.py [--repeats 2] [--steps 12] [--extract 300] [--validate 100] [--preset cpu-mid]
       [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
from pathlib import Path

from runs import gpu_peaks, print_result, run_worker, step_timer

# name -> (hidden, layers, heads, kv heads, MLP, vocabulary, dtype); ids of the tiny tokenizer stay < 512
PRESETS = {
    "cpu-mid": (512, 12, 8, 2, 1536, 512, "float32"),
    "smoke": (64, 12, 4, 2, 128, 512, "float32"),
    "smoke-8": (64, 8, 4, 2, 128, 512, "float32"),  # step_counts.py: 2 coupled layers of 8
    "llama3.1-8b": (4096, 32, 32, 8, 14336, 128256, "bfloat16"),  # the published architecture (GPU only)
}
ROWS_PER_ROLE = {"smoke": 80}  # default: extract + validate + 200 training rows


def build_assets(root: Path, preset: str, rows: int) -> Path:
    """Random-weight Llama-architecture model and the role datasets (``rows`` per role) under ``root``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llamafactory_hera.fixtures.harc_assets import llama3_tokenizer, write_role_datasets

    folder = root / f"{preset}-{rows}"
    if (folder / "done").is_file():
        return folder
    hidden, layers, heads, kv, mlp, vocab, dtype = PRESETS[preset]
    tok = llama3_tokenizer()
    config = LlamaConfig(vocab_size=max(vocab, len(tok)), hidden_size=hidden, intermediate_size=mlp,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                         max_position_embeddings=4096, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, torch_dtype=dtype)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(getattr(torch, dtype)).save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")
    write_role_datasets(folder / "data", seed=0, count=rows)
    (folder / "done").write_text("ok")
    return folder


def recipe(folder: Path, stage: str, output_dir: str, args: argparse.Namespace) -> dict:
    common = {
        "model_name_or_path": str(folder / "model"), "template": "llama3", "stage": stage, "do_train": True,
        "finetuning_type": "lora", "lora_target": "all", "lora_rank": 8, "lora_alpha": 16,
        "dataset_dir": str(folder / "data"), "gradient_accumulation_steps": 2, "learning_rate": 1e-4,
        "lr_scheduler_type": "constant", "max_steps": args.steps, "logging_steps": 1, "save_strategy": "no",
        "output_dir": output_dir, "overwrite_output_dir": True, "report_to": "none", "seed": 0,
        "bf16": args.device != "cpu", "disable_tqdm": True, "plot_loss": False, "cutoff_len": 512,
        "dataloader_num_workers": 0,  # gradient checkpointing as LLaMA-Factory's defaults have it (reentrant)
    }
    if stage == "sft":
        return {**common, "dataset": "harc_harmful,harc_harmless,harc_pseudo", "per_device_train_batch_size": 12,
                "preprocessing_num_workers": 1, "overwrite_cache": True}
    return {**common, "harc_harmful": "harc_harmful", "harc_harmless": "harc_harmless", "harc_pseudo": "harc_pseudo",
            "harc_harmful_completions": "harc_harmful_completions", "harc_extract_samples": args.extract,
            "harc_validate_samples": args.validate, "harc_refresh_steps": args.refresh_at, "harc_eval": False}


def worker(args: argparse.Namespace) -> None:
    """One run in this process; prints a JSON line with step end times, refresh seconds and peak memory."""
    import resource

    from llamafactory.train.tuner import run_exp

    folder = build_assets(Path(args.assets), args.preset, args.rows)
    timer = step_timer()
    refresh: list[dict] = []
    with tempfile.TemporaryDirectory() as out:
        run_exp(recipe(folder, args.worker, out, args), callbacks=[timer])
        layers = Path(out) / "harc_layers.json"
        if layers.is_file():
            refresh = json.loads(layers.read_text())["history"]
    steps = [b - a for a, b in zip(timer.ends, timer.ends[1:], strict=False)]
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print_result({"stage": args.worker, "steps": steps, "history": refresh, "peak_rss_mb": peak_rss,
                  **gpu_peaks(timer)})


def run_one(stage: str, args: argparse.Namespace) -> dict:
    options = ["--assets", args.assets, "--steps", str(args.steps), "--extract", str(args.extract), "--validate",
               str(args.validate), "--preset", args.preset, "--device", args.device, "--rows", str(args.rows),
               "--refresh-at", str(args.refresh_at)]
    return run_worker(str(Path(__file__)), stage, args.device, options)


def plain_steps(run: dict, warmup: int) -> list[float]:
    """Step times without the warm-up steps and without the step after each refresh (the refresh runs in the
    step-end callbacks after the timer's, so it lands in the next interval)."""
    refreshed = {entry["step"] + 1 for entry in run["history"] if entry["event"] == "refresh"}
    return [t for index, t in enumerate(run["steps"], start=1) if index > warmup and index not in refreshed]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--extract", type=int, default=300, help="held-out rows per role for the directions")
    parser.add_argument("--validate", type=int, default=100, help="held-out rows per role for the diagnostics")
    parser.add_argument("--refresh-at", type=int, default=6, help="optimizer step of the timed refresh")
    parser.add_argument("--reference-interval", type=int, default=100, help="steps between refreshes (reference)")
    parser.add_argument("--rows", type=int, default=0, help="rows per role (default: extract + validate + 200)")
    parser.add_argument("--preset", default="cpu-mid", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--assets", default=str(Path(tempfile.gettempdir()) / "harc_bench_assets"))
    parser.add_argument("--worker", choices=["sft", "harc"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.rows = args.rows or args.extract + args.validate + 200
    if args.worker:
        return worker(args)
    build_assets(Path(args.assets), args.preset, args.rows)
    results: dict[str, list[dict]] = {"sft": [], "harc": []}
    for repeat in range(args.repeats):
        for stage in (("sft", "harc"), ("harc", "sft"))[repeat % 2]:  # ABBA...: order effects cancel
            results[stage].append(run_one(stage, args))
            print(f"repeat {repeat + 1}/{args.repeats} {stage}: median step "
                  f"{statistics.median(plain_steps(results[stage][-1], args.warmup)) * 1e3:.1f} ms", flush=True)
    import torch

    step = {stage: statistics.median(t for run in runs for t in plain_steps(run, args.warmup))
            for stage, runs in results.items()}
    pairs = sorted(statistics.median(plain_steps(h, args.warmup)) / statistics.median(plain_steps(s, args.warmup))
                   for s, h in zip(results["sft"], results["harc"], strict=True))
    memory_key = "peak_gpu_mb" if args.device != "cpu" else "peak_rss_mb"
    memory = {stage: statistics.median(run[memory_key] for run in runs) for stage, runs in results.items()}
    refreshes = [entry["seconds"] for run in results["harc"] for entry in run["history"]
                 if entry["event"] == "refresh"]
    base = [entry["seconds"] for run in results["harc"] for entry in run["history"] if entry["event"] == "base"]
    refresh = statistics.median(refreshes)
    share = refresh / (refresh + args.reference_interval * step["harc"])
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}, device {args.device}; preset {args.preset} {PRESETS[args.preset]}; "
          f"{args.repeats} repeats (ABBA), {args.steps} steps of 12 rows x accumulation 2, warm-up {args.warmup} "
          f"dropped; extraction {args.extract} + {args.extract} prompts, 3 x {args.extract} answers, validation "
          f"{args.validate} + {args.validate}")
    print("baseline: SFT with LLaMA-Factory's defaults, as users run it (reentrant gradient checkpointing in every "
          "layer, as HARC runs it)")
    print(f"{'':30}{'sft':>12}{'harc':>12}{'ratio':>8}   target")
    print(f"{'step time (ms)':30}{step['sft'] * 1e3:12.1f}{step['harc'] * 1e3:12.1f}{step['harc'] / step['sft']:8.3f}"
          f"   <= 1.6   (per A/B pair: median {statistics.median(pairs):.3f}, {pairs[0]:.3f}-{pairs[-1]:.3f})")
    label = "peak GPU memory, training (MiB)" if args.device != "cpu" else "peak RSS (MiB)"
    print(f"{label:30}{memory['sft']:12.0f}{memory['harc']:12.0f}{memory['harc'] / memory['sft']:8.3f}   <= 1.1")
    if args.device != "cpu":  # loading included, and whatever ran before train begin
        whole = {stage: statistics.median(run["peak_gpu_process_mb"] for run in runs)
                 for stage, runs in results.items()}
        print(f"{'peak GPU memory, process (MiB)':30}{whole['sft']:12.0f}{whole['harc']:12.0f}"
              f"{whole['harc'] / whole['sft']:8.3f}")
    print(f"{'refresh (s)':30}{'':12}{refresh:12.2f}{'':8}   (base extraction {statistics.median(base):.2f} s)")
    print(f"{'refresh share':30}{'':12}{100 * share:11.1f}%{'':8}   <= 10% (every {args.reference_interval} steps)")


if __name__ == "__main__":
    main()
