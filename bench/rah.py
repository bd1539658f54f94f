"""RAH-LoRA's cost next to the model passes it cannot avoid, measured side by side in one process.

The calibration (``llamafactory_hera.rah.calibrate``) needs: one eager forward with attention weights per I-SAL
batch, one forward + backward to the head gates per CAF probe sample, and the trust region's probe forwards
(the original logits, then one per alpha tried, then the final KL). The baseline runs exactly those passes,
counted from the calibration it is compared with, on the same batches, with nothing else; the ratio is the
calibration's wall time over the baseline's (interleaved A/B, medians over repeats). Model loading is excluded
from both. Thresholds are loosened from the paper's (I-SAL 50th / CAF 30th percentile) so that an 8-head
random-weight model has targets to calibrate; the passes per target are the paper's.

Usage: python bench/rah.py [--repeats 3] [--samples 32] [--probe 8] [--kl 4] [--preset cpu-mid] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent


def _passes(model, calibration_batches, caf_batches, kl_batches, kinds, layers, kl_forwards):
    """The bare passes a calibration with ``kl_forwards`` probe sweeps needs, nothing else."""
    from llamafactory_hera.rah.plan import plan_calibration
    from llamafactory_hera.rah.probe import attention_modules, head_gates, token_masks
    from llamafactory_hera.rah.scores import margin_loss

    strip = lambda batch: {k: v for k, v in batch.items() if k != "labels"}  # noqa: E731
    geometry = plan_calibration(model).geometry
    with torch.no_grad():
        for batch in calibration_batches:
            model(**strip(batch), output_attentions=True, use_cache=False)
    modules = attention_modules(model)
    for batch in caf_batches:
        with head_gates(modules, layers, geometry.num_heads, geometry.head_dim) as gates:
            logits = model(**strip(batch), use_cache=False).logits
            mask = token_masks(batch["input_ids"], batch["attention_mask"], kinds)[2]
            torch.autograd.grad(margin_loss(logits, mask), [gates[layer] for layer in layers])
    with torch.no_grad():
        for _ in range(kl_forwards):
            for batch in kl_batches:
                model(**strip(batch), use_cache=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--samples", type=int, default=32, help="I-SAL rows (paper: 100)")
    parser.add_argument("--probe", type=int, default=8, help="CAF rows (paper: 32)")
    parser.add_argument("--kl", type=int, default=4, help="KL probe rows")
    parser.add_argument("--preset", default="cpu-mid")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--assets", default="/tmp/hera_bench_assets")
    args = parser.parse_args()
    sys.path.insert(0, str(BENCH))
    from assets import build_bench_assets

    from llamafactory_hera.rah.calibrate import calibrate
    from llamafactory_hera.rah.config import RahArguments
    from llamafactory_hera.rah.probe import attention_modules, token_kinds
    from llamafactory_hera_patches.tools.model_data import (
        load_model_for_scoring,
        multimodal_dataset_and_collator,
        parse_recipe,
    )

    assets = build_bench_assets(Path(args.assets), num_images=max(64, args.samples), preset=args.preset)
    recipe = parse_recipe({"model_name_or_path": str(assets.model), "template": assets.template, "stage": "sft",
                           "dataset": "hera_demo", "dataset_dir": str(assets.dataset_dir), "flash_attn": "disabled",
                           "cutoff_len": assets.preset.cutoff_len, "trust_remote_code": True})
    model, tokenizer_module, template = load_model_for_scoring(recipe, args.device)
    dataset, collator = multimodal_dataset_and_collator(recipe, model, tokenizer_module, template, 0,
                                                        list(range(args.samples)))
    on = lambda batch: {k: v.to(args.device) if torch.is_tensor(v) else v for k, v in batch.items()}  # noqa: E731
    calibration_batches = [on(collator([dataset[i]])) for i in range(args.samples)]
    caf_batches = calibration_batches[:args.probe]
    kl_batches = [on(collator([dataset[i] for i in range(args.kl)]))]
    kinds = token_kinds(model, tokenizer_module["tokenizer"], tokenizer_module.get("processor"))
    layers = list(range(len(attention_modules(model)) // 2))
    settings = RahArguments(rah_layers=layers, rah_isal_percentile=50.0, rah_caf_percentile=30.0)
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    times: dict[str, list[float]] = {"passes": [], "calibration": []}
    counts = None
    for repeat in range(args.repeats):
        for which in (("calibration", "passes") if repeat % 2 == 0 else ("passes", "calibration")):
            if which == "passes" and counts is None:
                continue  # the first calibration decides how many probe sweeps the baseline makes
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.copy_(original[name])
            sync()
            start = time.perf_counter()
            if which == "calibration":
                result = calibrate(model, calibration_batches, caf_batches, kl_batches, settings, kinds)
                sweeps = 2 + sum(len(u.region.tried) for u in result.updates if u.region is not None)
                counts = (len(result.updates), sum(1 for u in result.updates if u.calibrated),
                          sweeps)
            else:
                _passes(model, calibration_batches, caf_batches, kl_batches, kinds, layers, counts[2])
            sync()
            times[which].append(time.perf_counter() - start)
            print(f"repeat {repeat + 1}/{args.repeats} {which}: {times[which][-1]:.2f} s", flush=True)
    a, b = statistics.median(times["passes"]), statistics.median(times["calibration"])
    print(f"\npreset {args.preset} ({args.device}, torch threads {torch.get_num_threads()}): layers {layers[0]}.."
          f"{layers[-1]}, {args.samples} I-SAL rows, {args.probe} CAF rows, {args.kl} KL rows; {counts[0]} targets, "
          f"{counts[1]} calibrated, {counts[2]} probe sweeps")
    print(f"{'':28}{'passes':>10}{'calibration':>13}{'ratio':>8}")
    print(f"{'wall time (s), median':28}{a:>10.2f}{b:>13.2f}{b / a:>8.3f}   (target <= 1.3 on CPU)")


if __name__ == "__main__":
    main()
