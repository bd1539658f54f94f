"""A recipe's run before renting: its setup, memory per GPU by category, changes that would fit, bytes exchanged
(docs/cost.md, "What it counts").
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from llamafactory_hera.plan.cards import Card
from llamafactory_hera.recipe.dataset_info import as_names, dataset_info
from llamafactory_hera.recipe.quantization import quantized_bytes_per_weight
from llamafactory_hera.runtime.errors import RecipeError
from llamafactory_hera.runtime.raw_recipe import truthy

GIB = 2**30
RESERVE = 2 * GIB  # CUDA context (~0.5 GiB), cuBLAS / NCCL workspaces and the caching allocator's slack: stated
CAPTION_TOKENS = 64  # a selection caption's assumed length (hera_select_mode: text)
DEFAULT_MAX_PIXELS = 768 * 768  # LLaMA-Factory's image_max_pixels
ENGINES = {"ddp": "DDP", "zero2": "DeepSpeed ZeRO-2", "zero3": "DeepSpeed ZeRO-3", "fsdp2": "FSDP2"}
MIN_TEXT = 64  # tokens a shorter cutoff_len must leave beside the image: a question and a short answer
# what a more-GPUs fix adds to the plan command: each engine's shipped config
ENGINE_OPTIONS = {
    "fsdp2": "--accelerate-config recipes/accelerate/fsdp2_config.yaml",
    "fsdp2+bits": "--accelerate-config recipes/accelerate/fsdp2_qlora_config.yaml",
    "zero3": "deepspeed=recipes/deepspeed/ds_z3_config.json",
}


@dataclass(frozen=True)
class Setup:
    """What the recipe asks for, as the plan reads it."""

    stage: str
    lora: bool
    bits: int | None
    double_quant: bool
    engine: str
    gpus: int
    live_params: float  # ZeRO-3's stage3_max_live_parameters
    batch: int
    accumulation: int
    cutoff: int
    liger: bool
    checkpointing: bool
    epochs: float
    max_steps: int
    notes: tuple[str, ...] = ()  # what is planned as something else, one line each


def found(path: str | Path, recipe_dir: Path) -> Path:
    """A recipe's path from the working folder, else from the recipe's folder or the first one above holding it."""
    path = Path(path)
    if path.is_absolute() or path.exists():
        return path
    return next(
        (folder / path for folder in (recipe_dir, *recipe_dir.resolve().parents) if (folder / path).exists()), path
    )


def number(recipe: dict, key: str, default: float, kind: type = int) -> Any:
    """``recipe[key]`` (or ``default``) as ``kind``; else a one-line RecipeError."""
    value = recipe.get(key, default)
    try:
        return kind(value if value is not None else default)
    except (TypeError, ValueError):
        raise RecipeError(f"{key}: {value!r} is not a number; give it as {key}=<a number>.") from None


def _engine_of(zero: dict, where: str, notes: list[str]) -> str:
    offloaded = [
        key
        for key in ("offload_optimizer", "offload_param")
        if str((zero.get(key) or {}).get("device", "none")).lower() not in ("none", "")
    ]
    if offloaded:
        notes.append(f"{where}: {' and '.join(offloaded)} to the CPU is not counted (planned as kept on the GPU)")
    stage = int(zero.get("stage", zero.get("zero_stage", 0)) or 0)
    if stage == 1:
        notes.append(f"{where}: ZeRO-1 is planned as DDP (its sharded optimizer states not counted)")
    return {2: "zero2", 3: "zero3"}.get(stage, "ddp")


def setup_of(recipe: dict, recipe_dir: Path, gpus: int | None, accelerate_config: Path | None) -> Setup:
    """The recipe's setup; what is planned as something else goes into :attr:`Setup.notes`."""
    engine = "ddp"
    default_gpus = 1
    live = 1e9
    notes = []
    launch: dict = {}
    if accelerate_config is not None:
        try:
            launch = yaml.safe_load(accelerate_config.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as err:
            raise RecipeError(
                f"--accelerate-config: {accelerate_config} cannot be read ({err}); name the accelerate "
                "config file the run is launched with."
            ) from None
        default_gpus = number(launch, "num_processes", 1)
    if recipe.get("deepspeed") or launch.get("distributed_type") == "DEEPSPEED":
        named = recipe.get("deepspeed") or (launch.get("deepspeed_config") or {}).get("deepspeed_config_file")
        zero = launch.get("deepspeed_config") or {}
        if named:
            try:
                zero = json.loads(found(named, recipe_dir).read_text(encoding="utf-8")).get("zero_optimization", {})
            except (OSError, ValueError) as err:
                raise RecipeError(
                    f"deepspeed: {named} cannot be read ({err}); point it to the JSON config the run uses."
                ) from None
        engine = _engine_of(zero, "deepspeed", notes)
        live = float(zero.get("stage3_max_live_parameters", 1e9))
    elif launch.get("distributed_type") == "FSDP":
        engine = "fsdp2"
        if str(launch.get("fsdp_config", {}).get("fsdp_version", 2)) != "2":
            notes.append(
                "accelerate config: FSDP version 1 is planned as FSDP2 (which upcasts every parameter to "
                "float32; version 1 only the trained ones, so its parameters may need less)"
            )
        if truthy(launch.get("fsdp_config", {}).get("fsdp_offload_params", False)):
            notes.append("accelerate config: fsdp_offload_params is not counted (planned as kept on the GPU)")
    return Setup(
        stage=str(recipe.get("stage", "sft")),
        lora=recipe.get("finetuning_type", "lora") == "lora",
        bits=number(recipe, "quantization_bit", 0) or None,
        double_quant=truthy(recipe.get("double_quantization", True)),
        engine=engine,
        gpus=gpus or default_gpus,
        live_params=live,
        batch=number(recipe, "per_device_train_batch_size", 8),
        accumulation=number(recipe, "gradient_accumulation_steps", 1),
        cutoff=number(recipe, "cutoff_len", 2048),
        liger=truthy(recipe.get("enable_liger_kernel", False)) or truthy(recipe.get("use_liger_kernel", False)),
        checkpointing=not truthy(recipe.get("disable_gradient_checkpointing", False)),
        epochs=number(recipe, "num_train_epochs", 3.0, float),
        max_steps=number(recipe, "max_steps", -1),
        notes=tuple(notes),
    )


def memory(counts: dict[str, float], setup: Setup) -> dict[str, float]:
    """Bytes per GPU by category for one scaled arm under ``setup`` (activations and temporaries as counted)."""
    n = setup.gpus
    total = counts["params"]
    trainable = counts["trainable"]
    frozen = total - trainable
    quantizable = counts["quantizable"] if setup.bits else 0
    stored = quantizable * quantized_bytes_per_weight(setup.bits, setup.double_quant) if setup.bits else 0
    gathered = 0.0
    if setup.engine == "fsdp2":
        weights = (stored + 4 * (total - quantizable)) / n
        grads = 4 * trainable / n
        optimizer = 8 * trainable / n
        gathered = 2 * (2 * counts["layer"] + counts["embedding"])
    elif setup.engine == "zero3":
        weights = (2 * frozen + 6 * trainable) / n
        grads = 4 * trainable / n
        optimizer = 8 * trainable / n
        gathered = 2 * min(setup.live_params, total)
    elif setup.engine == "zero2":
        weights = 2 * total + 4 * trainable / n
        grads = 2 * trainable / n
        optimizer = 8 * trainable / n
    else:
        weights = stored + 2 * (frozen - quantizable) + 4 * trainable
        grads = 4 * trainable
        optimizer = 8 * trainable
    parts = {
        "parameters": weights,
        "gradients": grads,
        "optimizer": optimizer,
        "gathered": gathered,
        "activations": counts["activations"],
        "temporaries": counts["temporaries"],
    }
    parts["step peak"] = sum(parts.values())
    # A quantized load reads the bf16 shards onto the GPU before bitsandbytes quantizes them (measured: the 8B QLoRA
    # recipe's load peak is its whole bf16 model); FSDP2 and ZeRO-3 load a rank's shard
    sharded = setup.engine in ("fsdp2", "zero3") and not setup.bits
    parts["load peak"] = weights + gathered if sharded else 2 * (total - trainable)
    parts["needed"] = max(parts["step peak"], parts["load peak"]) + RESERVE
    return parts


def fixes(
    counts: dict[str, dict[str, float]], setup: Setup, card: Card, arm: str, image_tokens: int = 0
) -> list[tuple[tuple[str, ...], float]]:
    """(changes, bytes per GPU) for each single change and each pair that fits where neither alone does, cheapest
    first; a change as added to the plan command."""
    changes = _changes(counts, setup, card, arm, image_tokens)

    def needed(*chosen: tuple) -> float:
        arm_counts = dict(counts[arm + "".join(c[2] for c in chosen)])
        scale = math.prod(c[4] for c in chosen)
        for key in ("activations", "temporaries"):
            arm_counts[key] /= scale
        return memory(arm_counts, replace(setup, **{k: v for c in chosen for k, v in c[3].items()}))["needed"]

    shown = [c for c in changes if c[5]]
    out = [((c[1],), needed(c)) for c in sorted(shown)]
    alone = {c[1]: card.holds(needed(c)) for c in changes}
    pairs = [
        (a[0] + b[0], (a[1], b[1]), needed(a, b))
        for i, a in enumerate(changes)
        for b in changes[i + 1 :]
        if a[6] != b[6] and not (a[2] and b[2]) and not (alone[a[1]] or alone[b[1]])
    ]
    return out + [(change, need) for _, change, need in sorted(pairs) if card.holds(need)][:4]


def _changes(counts: dict[str, dict[str, float]], setup: Setup, card: Card, arm: str, image_tokens: int) -> list[tuple]:
    """Each change: (cost rank, command addition, arm suffix, setup changes, activations' divisor, shown alone,
    kind). A cutoff only where the image and :data:`MIN_TEXT` text tokens stay whole (else the row fails)."""
    out = []
    if f"{arm}+liger" in counts:
        out.append((1, "enable_liger_kernel=true", "+liger", {}, 1, True, "liger"))
    for factor in (2, 4, 8, 16):
        if setup.batch // factor >= 1:
            out.append(
                (
                    1 + factor / 100,
                    f"per_device_train_batch_size={setup.batch // factor} "
                    f"gradient_accumulation_steps={setup.accumulation * factor}",
                    "",
                    {},
                    factor,
                    factor == 2,
                    "batch",
                )
            )
    if f"{arm}+qlora" in counts:
        out.append((3, "quantization_bit=4", "+qlora", {"bits": 4}, 1, True, "bits"))
    engine = setup.engine if setup.engine != "ddp" else "fsdp2" if setup.lora else "zero3"
    option = "" if engine == setup.engine else f" {ENGINE_OPTIONS[engine + ('+bits' if setup.bits else '')]}"
    more = [
        gpus
        for gpus in sorted({2, 4, 8, 16, 32, 64, setup.gpus})
        if gpus > setup.gpus or (gpus == setup.gpus > 1 and engine != setup.engine)
    ]
    fewest = next(
        (gpus for gpus in more if card.holds(memory(counts[arm], replace(setup, engine=engine, gpus=gpus))["needed"])),
        None,
    )
    out += [
        (4 + gpus / 100, f"--gpus {gpus}{option}", "", {"engine": engine, "gpus": gpus}, 1, gpus == fewest, "gpus")
        for gpus in more
    ]
    out += [
        (5 + factor / 100, f"cutoff_len={setup.cutoff // factor}", "", {}, factor, True, "cutoff")
        for factor in (2, 4)
        if setup.cutoff // factor >= max(256, image_tokens + MIN_TEXT)
    ]
    return out


def communicated(counts: dict[str, float], setup: Setup) -> tuple[float, float]:
    """Bytes each GPU receives per micro-step and per optimizer step, by docs/cost.md's collectives."""
    n = setup.gpus
    total = counts["params"]
    trained = counts["trainable"]
    ring = (n - 1) / n
    quantized = counts["quantizable"] if setup.bits else 0
    weights = 2 * (total - quantized) + quantized * (
        quantized_bytes_per_weight(setup.bits, setup.double_quant) if setup.bits else 0
    )
    return {
        "fsdp2": (ring * (2 * weights + 4 * trained), 0.0),
        "zero3": (ring * (2 * weights + 2 * trained), 0.0),
        "zero2": (ring * 2 * trained, ring * 2 * trained),
        "ddp": (0.0, 2 * ring * 4 * trained),
    }[setup.engine]


def selection_flops(counts: dict[str, float], samples: int) -> float:
    """``hera_heads: auto``: ``samples`` captions of :data:`CAPTION_TOKENS` through the language model (their images:
    :func:`.timing.teacher_pass`)."""
    return samples * 2 * (counts["params"] - counts["vision"]) * CAPTION_TOKENS


def dataset_rows(recipe: dict, recipe_dir: Path) -> int | None:
    """The datasets' rows when each is a local JSON / JSONL file (``max_samples`` caps each)."""
    names = as_names(recipe.get("dataset"))
    folder = found(recipe.get("dataset_dir", "data"), recipe_dir)
    try:
        info = dataset_info(str(folder), "dataset", names)
        total = 0
        for name in names:
            text = (folder / info[name]["file_name"]).read_text(encoding="utf-8")
            rows = (
                len(json.loads(text))
                if text.lstrip().startswith("[")
                else sum(1 for line in text.splitlines() if line.strip())
            )
            total += min(rows, int(recipe.get("max_samples") or rows))
    except (OSError, ValueError, KeyError, TypeError, RecipeError):
        return None
    return total or None
