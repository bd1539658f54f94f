"""Head selection's cost next to a plain forward pass over the same N captions.

Both sides use the same loaded model, tokenizer and batches (model loading excluded from both):
- plain: the captions through the text decoder, no hooks;
- selection: the same forward with every layer's o_proj input pooled (hooks), the teacher on the N
  images, and the MKNN score of every head (Gram matrices, no d-wide vectors).
Runs are interleaved A/B; the script prints medians, the ratio and selection's breakdown.

Usage: python bench/selection.py [--samples 256] [--repeats 3] [--batch 16] [--device cpu] [--end-to-end]
       [--preset cpu-mid|qwen2.5-vl-7b|qwen3-vl-8b]
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

BENCH = Path(__file__).resolve().parent
for _key, _value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                     "DISABLE_VERSION_CHECK": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_key, _value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default="cpu-mid", help="model and teacher architecture (bench/assets.py PRESETS); "
                        "GPU: qwen2.5-vl-7b")
    parser.add_argument("--end-to-end", action="store_true",
                        help="also time `llamafactory-hera select` as a user runs it (one run, model loading included)")
    parser.add_argument("--clamp", type=float, default=0.95, help="PRH outlier clamp of the scoring (0: off)")
    parser.add_argument("--assets", default=str(Path(tempfile.gettempdir()) / "hera_bench_assets"))
    args = parser.parse_args()
    sys.path.insert(0, str(BENCH))
    import torch
    from assets import build_bench_assets

    from llamafactory_hera.heads.architecture import text_decoder
    from llamafactory_hera.heads.geometry import attention_geometry
    from llamafactory_hera.hera.selection import collect
    from llamafactory_hera.hera.selection.scores import all_head_neighbours
    from llamafactory_hera.hera.selection.select import SelectionOptions, prepare
    from llamafactory_hera.hera.teacher import load_image_processor, load_teacher, teacher_batch_size
    from llamafactory_hera_patches.tools.model_data import load_model_for_scoring, parse_recipe

    assets = build_bench_assets(Path(args.assets), num_images=args.samples, preset=args.preset)
    args.teacher = assets.teacher
    recipe = {"model_name_or_path": str(assets.model), "template": assets.template, "dataset": "hera_demo",
              "dataset_dir": str(assets.dataset_dir), "stage": "sft", "finetuning_type": "lora"}
    recipe_args = parse_recipe(recipe)
    options = SelectionOptions(num_samples=args.samples, k=args.k, teacher=str(assets.teacher), device=args.device,
                               batch_size=args.batch, progress=False)
    pairs, _ = prepare(recipe_args, options)
    model, tokenizer_module, _ = load_model_for_scoring(recipe_args, args.device)
    tokenizer = tokenizer_module["tokenizer"]
    decoder = text_decoder(model)
    head_dim = attention_geometry(model.config).head_dim
    teacher = load_teacher(str(assets.teacher), "cls", args.device)
    processor = load_image_processor(str(assets.teacher))

    def sync() -> None:
        if torch.cuda.is_available() and args.device != "cpu":
            torch.cuda.synchronize()

    @torch.inference_mode()
    def plain() -> dict[str, float]:
        start = time.perf_counter()
        for i in range(0, len(pairs), args.batch):
            encoded = tokenizer([p.caption for p in pairs[i:i + args.batch]], padding=True, return_tensors="pt")
            decoder(input_ids=encoded["input_ids"].to(args.device),
                    attention_mask=encoded["attention_mask"].to(args.device))
        sync()
        return {"total": time.perf_counter() - start}

    def selection() -> dict[str, float]:
        t0 = time.perf_counter()
        pooled = collect.collect_text(model, tokenizer, pairs, args.batch, args.device, progress=False)
        sync()
        t1 = time.perf_counter()
        feats = collect.collect_teacher(teacher, processor, pairs, teacher_batch_size(args.batch), progress=False)
        sync()
        t2 = time.perf_counter()
        all_head_neighbours(pooled, collect.layer_weights(model), feats, args.k, head_dim, args.device, args.clamp)
        sync()
        t3 = time.perf_counter()
        return {"total": t3 - t0, "forward+pooling": t1 - t0, "teacher": t2 - t1, "scoring": t3 - t2}

    plain(), selection()  # warm-up
    runs: dict[str, list[dict[str, float]]] = {"plain": [], "selection": []}
    for _ in range(args.repeats):
        runs["plain"].append(plain())
        runs["selection"].append(selection())
    med = {name: statistics.median(r["total"] for r in values) for name, values in runs.items()}
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
          f"device {args.device}; N={len(pairs)} captions, batch {args.batch}, k={args.k}, clamp {args.clamp}, "
          f"{args.repeats} repeats A/B")
    print(f"plain forward       {med['plain']:8.3f} s")
    paired = sorted(s["total"] / p["total"] for p, s in zip(runs["plain"], runs["selection"], strict=True))
    print(f"head selection      {med['selection']:8.3f} s   ratio {med['selection'] / med['plain']:.3f} "
          f"(A/B pairs: median {statistics.median(paired):.3f}, range {paired[0]:.3f}-{paired[-1]:.3f})")
    for part in ("forward+pooling", "teacher", "scoring"):
        print(f"  {part:17} {statistics.median(r[part] for r in runs['selection']):8.3f} s")
    if args.end_to_end:
        del model, teacher
        print(f"end to end: `llamafactory-hera select` (new process: imports, data, model and teacher loading, "
              f"scoring, record and heatmap) {end_to_end(recipe, args):.1f} s")


def end_to_end(recipe: dict, args: argparse.Namespace) -> float:
    """Wall time of the user's command on a recipe file, N samples, --dry-run (writes no recipe)."""
    import subprocess

    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recipe.yaml"
        path.write_text(yaml.safe_dump({**recipe, "output_dir": str(Path(tmp) / "run")}))
        # `python -m` works where the console scripts are not on PATH (pip install --target on the GPU machine)
        command = [sys.executable, "-m", "llamafactory_hera.cli", "select", str(path), "--samples", str(args.samples),
                   "--k", str(args.k), "--teacher", str(args.teacher), "--device", args.device, "--batch-size",
                   str(args.batch), "--clamp", str(args.clamp), "--dry-run"]
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, env={**os.environ, "TQDM_DISABLE": "1"})
        return time.perf_counter() - start


if __name__ == "__main__":
    main()
