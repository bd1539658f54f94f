"""HeRA's cost counted at the real sizes on a CPU, beside its SFT twin: FLOPs, peak memory per GPU by
category and the bytes each micro-step all-gathers and reduce-scatters, of the recipes' own architectures built from
their configs under fake tensors (no weights, no network), and head selection beside one forward pass and in
seconds per 1,000 pairs on H100s (where its model is placed, the bytes copied from the CPU).

    .venv/bin/python bench/cost.py            # every case, the table of docs/cost.md (a few minutes)
    .venv/bin/python bench/cost.py --case 8b-lora --detail
    .venv/bin/python bench/cost.py --selection-time   # docs/cost.md "Head selection's time"

What is counted: every op of the step (forward, HeRA's capture / projection / loss, backward with the recomputation
of gradient checkpointing) on fake tensors of the real shapes; memory is the storages the step's ops create (peak,
and those alive at the forward's end = activations) plus the parameters, gradients (steady state: allocated, as from
the second micro-step of an accumulation) and Adam's two moments of this rank; collectives are hooked at the
dispatcher (bench/cost_count.py). Layers: each model is counted with its head layers, one more decoder layer and one
more vision block, and scaled linearly to the full depth (every other layer has the cost of the added one). Assumed,
not counted: every row ``cutoff_len`` long with one image, the teacher's features cached (``hera_teacher_precompute``,
the default: no teacher on the GPU during steps), CUDA context / workspaces / allocator fragmentation (the table adds
none), the optimizer step's own temporaries. The shims (4-bit, ZeRO-3, Liger, the anchors' count exchange) are listed
in bench/cost_models.py.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import yaml
from accelerate.utils import compute_module_sizes
from torch._subclasses.fake_tensor import FakeTensorMode

from llamafactory_hera.plan import counter as cc
from llamafactory_hera.plan.count import head_layers
from llamafactory_hera.recipe.quantization import quantized_bytes_per_weight

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cost_count as cx  # noqa: E402
import cost_models as cm  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
HEADS = ["L13H12", "L7H6", "L3H5", "L13H13", "L13H15"]  # paper, Table 5 (Qwen3-8B): 5 heads in 3 layers
CAPTION_TOKENS = 64  # assumed length of a selection caption (hera_select_mode: text)


@dataclass(frozen=True)
class Case:
    name: str
    recipe: str
    spec: dict
    world: int = 1
    mode: str = "lora"  # lora | qlora | full
    card: str = "80 GB"
    zero3: bool = False  # DeepSpeed ZeRO-3, counted as FSDP2 with its dtypes (bench/cost_models.py)
    heads: tuple[str, ...] = tuple(HEADS)
    batch: int | None = None  # per_device_train_batch_size other than the recipe's


CASES = (
    Case("8b-lora", "qwen3_8b_hera.yaml", cm.QWEN3_VL_8B),
    Case("8b-qlora", "qwen3_8b_hera_qlora.yaml", cm.QWEN3_VL_8B, mode="qlora", card="24 GB"),
    Case("8b-fsdp2", "qwen3_8b_hera_fsdp2.yaml", cm.QWEN3_VL_8B, world=8, card="24 GB"),
    Case("8b-full-zero3", "qwen3_8b_hera_full.yaml", cm.QWEN3_VL_8B, world=8, mode="full", zero3=True),
    Case("72b-fsdp2-8", "qwen2_5_72b_hera_fsdp2.yaml", cm.QWEN2_5_VL_72B, world=8),
    Case("72b-fsdp2-16", "qwen2_5_72b_hera_fsdp2.yaml", cm.QWEN2_5_VL_72B, world=16),
    Case("72b-qlora-fsdp2-2", "qwen3_8b_hera_qlora.yaml", cm.QWEN2_5_VL_72B, world=2, mode="qlora", card="24 GB",
         batch=1),
)


def count_arm(case: Case, recipe: dict, text_layers: int, vision_depth: int, arm: str) -> dict[str, float]:
    """One micro-step of ``arm`` (sft, hera, hera+liger) on the reduced model: its counts, in bytes and FLOPs."""
    mesh = cx.fake_world(case.world)
    config = cm.reduced(case.spec, text_layers, vision_depth)
    data = cm.batch(config, int(recipe["per_device_train_batch_size"]), int(recipe["cutoff_len"]),
                    case.spec["image_side"] ** 2)
    with FakeTensorMode(allow_non_fake_inputs=True):  # the real-index shim only in the step: a parameter that goes
        # through it gets a weak reference, and Module.to cannot swap a fake parameter that has one
        model = cm.build(config)
        if case.mode == "full":
            cm.set_trainable(model, ("language", "projector"))
        else:
            model = cm.add_lora(model, int(recipe.get("lora_rank", 8)), int(recipe.get("lora_alpha", 16)))
        quantized = cm.quantize_in_place(model) if case.mode == "qlora" else []
        cm.train_mode(model, checkpointing=True)
        with cm.zero3_reads(case.zero3):
            hera = cm.hera_parts(model, head_layers(list(case.heads), 0)[0], recipe) if arm != "sft" else None
            if mesh is not None:
                cm.shard(model, mesh, torch.bfloat16, fp32_params=True)
            params = list(model.parameters())
            trainable = [p for p in params if p.requires_grad]
            for p in trainable:  # steady state of gradient accumulation: the gradients exist before the step
                p.grad = torch.zeros_like(p)
            weights = sum(cx.local_bytes(p) for p in params) + sum(b.numel() * b.element_size()
                                                                   for b in model.buffers())
            if quantized:
                per_weight = quantized_bytes_per_weight(4, bool(recipe.get("double_quantization",
                                                                                           True)))
                weights -= sum(cx.local_bytes(m.weight) // m.weight.element_size()
                               * (m.weight.element_size() - per_weight) for m in quantized)
            grads = sum(cx.local_bytes(p) for p in trainable)
            local = [p.to_local() if hasattr(p, "to_local") else p for p in params]
            counter = cx.CollectiveCounter(exclude=local + [p.grad.to_local() if hasattr(p.grad, "to_local")
                                                            else p.grad for p in trainable])
            with cc.RealIndexMode(), cc.StepFlops() as flops, counter:
                cm.step(model, data, counter, hera, liger=arm.endswith("liger"), term=cm.gathered_hera_term)
    collectives = counter.collectives
    return {"flops": flops.get_total_flops(), "weights": weights, "gradients": grads, "optimizer": 2 * grads,
            "activations": counter.at_mark, "temporaries": counter.peak - counter.at_mark,
            "all-gather": collectives.get("all-gather", 0),
            "reduce-scatter": collectives.get("reduce-scatter", 0),
            "all-reduce": collectives.get("all-reduce", 0)}


def scaled_arms(case: Case, recipe: dict) -> dict[str, dict[str, float]]:
    """Each arm's counts at the full depth: the reduced model (its head layers, one more decoder layer, the vision
    tower's special blocks) plus one decoder layer's and one vision block's increments times the layers it leaves
    out. The vision increment is SFT's for every arm (the frozen tower runs alike in all), the decoder layer's
    HeRA's for HeRA with Liger (Liger changes only the output layer and the loss)."""
    heads_layers = len({h.split("H")[0] for h in HEADS})
    vision = case.spec["vision"]
    special = len(vision.get("deepstack_visual_indexes", vision.get("fullatt_block_indexes", [])))
    base_l, base_v = heads_layers + 1, max(special, 1)
    full_l, full_v = case.spec["text"]["num_hidden_layers"], vision["depth"]
    base = {arm: count_arm(case, recipe, base_l, base_v, arm) for arm in ("sft", "hera", "hera+liger")}
    more_l = {arm: count_arm(case, recipe, base_l + 1, base_v, arm) for arm in ("sft", "hera")}
    more_l["hera+liger"] = more_l["hera"]
    more_v = count_arm(case, recipe, base_l, base_v + 1, "sft")
    return {arm: {key: counts[key] + (full_l - base_l) * (more_l[arm][key] - base[arm if arm in ("sft", "hera")
                                                                                   else "hera"][key])
                  + (full_v - base_v) * (more_v[key] - base["sft"][key]) for key in counts}
            for arm, counts in base.items()}


def peak(counts: dict[str, float]) -> float:
    return sum(counts[k] for k in ("weights", "gradients", "optimizer", "activations", "temporaries"))


def selection_flops(spec: dict, samples: int) -> dict[str, float]:
    """FLOPs of ``hera_heads: auto`` on ``samples`` pairs (text mode: captions through the text decoder with the
    pooling hooks on every o_proj, the teacher on every image, every head scored) and of one ordinary forward of the
    same captions."""
    from transformers import Dinov2Config, Dinov2Model

    from llamafactory_hera.hera.selection.collect import CalibrationPair, collect_text
    from llamafactory_hera.hera.selection.scores import all_head_neighbours

    cx.fake_world(1)
    batch = 8

    def tokenizer(captions, **_):  # noqa: ANN001, ANN202
        ids = torch.full((len(captions), CAPTION_TOKENS), 100)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "special_tokens_mask": torch.zeros_like(ids)}

    def per_layer(layers: int) -> tuple[float, float]:
        config = cm.reduced(spec, layers, 1)
        with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
            model = cm.build(config).eval()
            ids = tokenizer([""] * batch)
            with cc.RealIndexMode(), cc.StepFlops() as plain:
                model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"])
            pairs = [CalibrationPair(i, "", ()) for i in range(batch)]
            with cc.RealIndexMode(), cc.StepFlops() as hooked:
                collect_text(model, tokenizer, pairs, batch, "cpu", progress=False)
        return plain.get_total_flops(), hooked.get_total_flops()

    (p1, h1), (p2, h2) = per_layer(1), per_layer(2)
    layers = spec["text"]["num_hidden_layers"]
    plain, hooked = p1 + (layers - 1) * (p2 - p1), h1 + (layers - 1) * (h2 - h1)
    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
        torch.set_default_dtype(torch.bfloat16)
        try:
            teacher = Dinov2Model(Dinov2Config(**cm.DINOV2_LARGE)).eval()
        finally:
            torch.set_default_dtype(torch.float32)
        with cc.StepFlops() as teach:
            teacher(pixel_values=torch.empty(batch, 3, 224, 224, dtype=torch.bfloat16))
        text = spec["text"]
        heads = text["num_attention_heads"]
        dim = text.get("head_dim", text["hidden_size"] // heads)
    # scoring runs on real tensors (its top-k checks ties on the host), one layer at full N, on this CPU
    with cc.StepFlops() as score:
        all_head_neighbours({0: torch.randn(samples, heads * dim)}, {0: torch.randn(text["hidden_size"], heads * dim)},
                            torch.randn(samples, 1024), 10, dim, device="cpu")
    scoring = score.get_total_flops() * layers
    return {"forward": plain / batch * samples, "selection": (hooked + teach.get_total_flops()) / batch * samples
            + scoring}


def selection_ratio(spec: dict, samples: int) -> float:
    """Selection's FLOPs over one ordinary forward of the same captions (:func:`selection_flops`)."""
    flops = selection_flops(spec, samples)
    return flops["selection"] / flops["forward"]


H100_BF16 = 989.4e12  # FLOP/s, dense bf16 peak of an H100 SXM
MFU = (0.3, 0.5)  # the share of it a forward of 16 captions x 64 tokens reaches, assumed
HOST_TO_GPU = (25e9, 50e9)  # bytes/s over PCIe 5 x16: pageable (accelerate's offloaded weights) .. pinned


def selection_time(spec: dict, gpus: int, samples: int = 1000, batch: int = 16) -> str:
    """Head selection's counted time per ``samples`` pairs on ``gpus`` H100s of 80 GB (all free, 400 GB of RAM):
    its FLOPs at :data:`MFU` of :data:`H100_BF16`, plus, where the placement (llamafactory_hera.placement) leaves
    decoder layers on the CPU, their bytes copied to the GPU in every batch at :data:`HOST_TO_GPU`."""
    from unittest import mock

    from llamafactory_hera import placement
    from llamafactory_hera.heads.architecture import text_decoder

    config = cm.reduced(spec, spec["text"]["num_hidden_layers"], spec["vision"]["depth"])
    with torch.device("meta"):
        meta = cm.build(config)
    decoder = next(name for name, module in meta.named_modules() if module is text_decoder(meta))
    free = {index: 80 * 10**9 for index in range(gpus)} | {"cpu": 400 * 10**9}
    with mock.patch.object(placement, "free_memory", lambda device: free):
        device_map = placement.device_map_for(meta, spec["family"], "cuda:0", "bfloat16") or {}
    sizes = compute_module_sizes(meta, dtype=torch.bfloat16)
    copied = sum(sizes[name] for name, at in device_map.items() if at == "cpu" and name.startswith(decoder))
    flops = selection_flops(spec, samples)["selection"]
    batches = -(-samples // batch)
    slow, fast = (flops / (H100_BF16 * MFU[0]) + batches * copied / HOST_TO_GPU[0],
                  flops / (H100_BF16 * MFU[1]) + batches * copied / HOST_TO_GPU[1])
    return (f"{spec['family']} on {gpus} x 80 GB: {flops / 1e15:.2f} PFLOPs per {samples} pairs, {copied / 1e9:.1f} GB "
            f"copied from the CPU per batch of {batch} ({batches} batches): {fast:.0f}-{slow:.0f} s")


def run_case(case: Case, overrides: dict | None = None) -> dict:
    recipe = {**yaml.safe_load((REPO / "recipes" / case.recipe).read_text()), **(overrides or {})}
    recipe |= {} if case.batch is None else {"per_device_train_batch_size": case.batch}
    arms = scaled_arms(case, recipe)
    return {"case": case, "recipe": recipe, "arms": arms}


def gib(value: float) -> str:
    return f"{value / cc.GIB:.2f}"


def table(results: list[dict], selection: dict[str, float]) -> str:
    lines = ["| case | recipe | GPUs | peak memory per GPU, HeRA (GiB) | HeRA/SFT memory | HeRA/SFT FLOPs | "
             "extra gathered per micro-step (MiB) | peak with Liger FLCE (GiB) | selection / forward |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        case, sft, hera, liger = r["case"], r["arms"]["sft"], r["arms"]["hera"], r["arms"]["hera+liger"]
        extra = (hera["all-gather"] - sft["all-gather"]) / 2**20
        sel = selection.get(case.spec["family"], float("nan"))
        lines.append(f"| {case.name} | `{case.recipe}` | {case.world} ({case.card}) | {gib(peak(hera))} | "
                     f"{peak(hera) / peak(sft):.4f} | {hera['flops'] / sft['flops']:.4f} | {extra:.1f} | "
                     f"{gib(peak(liger))} | {sel:.2f} |")
    return "\n".join(lines)


def detail(r: dict) -> str:
    rows = [f"{r['case'].name}: {r['case'].recipe}, batch {r['recipe']['per_device_train_batch_size']} x "
            f"{r['recipe']['cutoff_len']} tokens, {r['case'].world} rank(s), {r['case'].mode}"]
    keys = ("weights", "gradients", "optimizer", "activations", "temporaries")
    for arm, c in r["arms"].items():
        rows.append(f"  {arm:10} TFLOPs {c['flops'] / 1e12:8.1f} | " + " ".join(f"{k} {gib(c[k])}" for k in keys)
                    + f" | peak {gib(peak(c))} GiB | all-gather {c['all-gather'] / 2**20:.0f} MiB, reduce-scatter "
                    f"{c['reduce-scatter'] / 2**20:.0f} MiB, all-reduce {c['all-reduce'] / 2**20:.2f} MiB")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", action="append", choices=[c.name for c in CASES])
    parser.add_argument("--detail", action="store_true", help="every arm's categories and collectives")
    parser.add_argument("--no-selection", action="store_true")
    parser.add_argument("--selection-time", action="store_true",
                        help="head selection's counted time per 1000 pairs at 8B and 72B on H100s, and nothing else")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key, e.g. per_device_train_batch_size=8 (bench/gpu.sh's step)")
    parser.add_argument("--image-side", type=int, help="image side in pixels (default: the recipe's 512 / 448)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # one case in this process, its counts as JSON
    args = parser.parse_args()
    overrides = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.set)}
    cases = [replace(case, spec={**case.spec, "image_side": args.image_side}) if args.image_side else case
             for case in CASES if not args.case or case.name in args.case]
    if args.selection_time:
        for spec, gpus in ((cm.QWEN3_VL_8B, 1), (cm.QWEN2_5_VL_72B, 8), (cm.QWEN2_5_VL_72B, 1)):
            print(selection_time(spec, gpus), flush=True)
        return
    if args.worker:
        result = run_case(next(case for case in cases if case.name == args.worker), overrides)
        print(json.dumps({"arms": result["arms"], "recipe": result["recipe"]}))
        return
    start = time.time()
    results = []
    for case in cases:  # each case in its own process: FSDP2's and the shims' global state stays in it
        command = [sys.executable, __file__, "--worker", case.name, *sum((["--set", item] for item in args.set), []),
                   *(["--image-side", str(args.image_side)] if args.image_side else [])]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{case.name} failed:\n{done.stderr[-3000:]}")
        results.append({"case": case, **json.loads(done.stdout.strip().splitlines()[-1])})
        if args.detail:
            print(detail(results[-1]), flush=True)
    selection = {} if args.no_selection else {spec["family"]: selection_ratio(spec, 1000)
                                              for spec in {r["case"].spec["family"]: r["case"].spec
                                                           for r in results}.values()}
    print(table(results, selection))
    print(f"counted in {time.time() - start:.0f} s on {torch.get_num_threads()} CPU threads, torch "
          f"{torch.__version__}; micro-step = one forward + backward of per_device_train_batch_size rows; memory: "
          "tensors only (add ~1-2 GiB for the CUDA context, workspaces and fragmentation)")


if __name__ == "__main__":
    main()
