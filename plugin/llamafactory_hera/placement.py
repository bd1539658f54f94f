"""Where a forward-only job (head selection, RAH-LoRA's calibration) holds its model in one process: whole on its
device if it fits; else over the visible GPUs, balanced by accelerate, then CPU RAM; refused before any weight loads
if all together cannot hold it. Sizes come from the config (a meta-device model), not the weights.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from accelerate.utils import compute_module_sizes, get_balanced_memory, infer_auto_device_map

from llamafactory_hera.heads.architecture import head_projections
from llamafactory_hera.recipe.quantization import quantized_bytes_per_weight
from llamafactory_hera.runtime.errors import RecipeError
from llamafactory_hera.runtime.log import show

HEADROOM = 0.9  # of what is free: the rest for activations, allocator blocks, the loader's transient copies
FIX = "Free memory or run on a machine with more GPU memory or RAM"


def gb(size: float) -> str:
    return f"{size / 1e9:.1f} GB"


def stored_bytes(meta: torch.nn.Module, dtype: str, bits: int | None = None, double_quant: bool = True) -> int:
    """Bytes of ``meta``'s weights in ``dtype``; with ``bits``, as LLaMA-Factory's ``quantization_bit`` stores them."""
    linears = [m for name, m in meta.named_modules() if bits and type(m) is torch.nn.Linear and "lm_head" not in name]
    return compute_module_sizes(meta, dtype=getattr(torch, dtype))[""] + sum(
        math.ceil(m.weight.numel() * quantized_bytes_per_weight(bits, double_quant, m.in_features))
        - m.weight.numel() * getattr(torch, dtype).itemsize
        for m in linears
    )


def plan_memory(model_bytes: int, reserve: int, free: dict[Any, int]) -> dict[Any, int] | None:
    """accelerate's ``max_memory``: None when ``model_bytes`` fits the job's device and the CPU keeps ``reserve``;
    else each place's budget: ``HEADROOM`` of its free bytes, less ``reserve`` on the CPU."""
    budgets = {place: int(size * HEADROOM) - (reserve if place == "cpu" else 0) for place, size in free.items()}
    first, *_ = budgets
    return None if model_bytes <= budgets[first] and budgets.get("cpu", 0) >= 0 else budgets


def free_memory(device: str) -> dict[Any, int]:
    """Free bytes of the job's device, of the other visible GPUs when this is the node's only process, and of CPU
    RAM, in that order."""
    import psutil  # lazy: an accelerate dependency, only when a model is placed

    ram = psutil.virtual_memory().available
    parsed = torch.device(device)
    if parsed.type != "cuda":
        return {"cpu": ram}
    first = torch.cuda.current_device() if parsed.index is None else parsed.index
    alone = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) <= 1
    gpus = [first, *(index for index in range(torch.cuda.device_count() if alone else 0) if index != first)]
    return {index: torch.cuda.mem_get_info(index)[0] for index in gpus} | {"cpu": ram}


def device_map_for(
    meta: torch.nn.Module,
    model_name: str,
    device: str,
    dtype: str,
    *,
    job: str = "head selection",
    reserve: tuple[int, str] = (0, ""),
    fix: str = FIX,
    bits: int | None = None,
    double_quant: bool = True,
) -> dict[str, Any] | None:
    """The ``device_map`` for ``job`` to load ``meta``'s model, said in one line; None: whole on ``device``. A
    RecipeError if it does not fit, naming the bytes needed, ``fix`` and each ``quantization_bit`` that would fit."""
    if torch.device(device).type not in ("cpu", "cuda") or getattr(meta.config, "quantization_config", None):
        show(f"{job}: {model_name} loads whole on {device}, as LLaMA-Factory loads it.")
        return None
    sizes = compute_module_sizes(meta, dtype=getattr(torch, dtype))
    size = stored_bytes(meta, dtype, bits, double_quant)
    reserve_bytes, reserve_for = reserve
    budgets = plan_memory(size, reserve_bytes, free := free_memory(device))
    stored = f"{bits} bits (bitsandbytes; the rest in {dtype})" if bits else dtype
    if budgets is None:
        show(
            f"{job}: the model is {gb(size)} in {stored}; it fits whole on {device} "
            f"({gb(next(iter(free.values())))} free)."
        )
        return None
    device_map = {"": "disk"}  # accelerate's last resort, which no job here takes (a quantized model: whole)
    no_split = list(getattr(meta, "_no_split_modules", None) or [])
    if not bits and sum(budgets.values()) >= size and min(budgets.values()) >= 0:
        balanced = (
            budgets
            if sum(isinstance(place, int) for place in budgets) < 2
            else get_balanced_memory(
                meta, max_memory=dict(budgets), no_split_module_classes=no_split, dtype=getattr(torch, dtype)
            )
        )
        device_map = infer_auto_device_map(
            meta, max_memory=balanced, dtype=getattr(torch, dtype), no_split_module_classes=no_split
        )
    if any(at not in budgets for at in device_map.values()):
        besides = f" and {gb(reserve_bytes)} of CPU RAM for {reserve_for}" if reserve_bytes else ""
        smaller = [
            f"{fewer} ({gb(need)})"
            for fewer in (8, 4)
            if fewer < (bits or 16)  # that fit whole
            and plan_memory(need := stored_bytes(meta, dtype, fewer), reserve_bytes, free) is None
        ]
        raise RecipeError(
            f"model_name_or_path: {model_name}: {job} needs {gb(size)} for the model in {stored}"
            f"{' whole on ' + device if bits else ''}{besides}, {HEADROOM:.0%} of the free memory usable: "
            + ", ".join(f"{_name(place)} has {gb(free_bytes)}" for place, free_bytes in free.items())
            + f". {fix}"
            + (f", or set quantization_bit: {' or '.join(smaller)}." if smaller else ".")
        )
    placed = {place: sum(sizes[name] for name, at in device_map.items() if at == place) for place in budgets}
    offloaded = any(held for place, held in placed.items() if not isinstance(place, int))
    show(
        f"{job}: the model is {gb(size)} in {dtype}, more than {device} holds: "
        + ", ".join(f"{gb(held)} on {_name(place)}" for place, held in placed.items())
        + (
            " (offloaded: each batch copies the layers it runs from there to a GPU, one at a time)."
            if offloaded
            else " (no layer offloaded)."
        )
    )
    return device_map


def _name(place: Any) -> str:
    return f"cuda:{place}" if isinstance(place, int) else place


def check_model_structure(model_name_or_path: str, trust_remote_code: bool) -> torch.nn.Module | None:
    """An empty (meta-device) model of the config, every decoder layer checked for ``o_proj`` (None: not buildable)."""
    from transformers import AutoConfig  # lazy: see below

    try:
        config = AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise RecipeError(
            f"model_name_or_path: {model_name_or_path}: its config cannot be read "
            f"({str(err).splitlines()[0]}). Give the folder of a local model (holding its config.json) "
            "or a Hugging Face model id that is cached or reachable."
        ) from None
    # lazy: the model classes (generation code, scikit-learn) only once a model is read: `select`'s one-line errors
    # (--device, the recipe) come at once
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    model = None
    for auto in (AutoModelForImageTextToText, AutoModelForCausalLM):
        try:
            with torch.device("meta"):
                model = auto.from_config(config, trust_remote_code=trust_remote_code)
            break
        except (ValueError, KeyError, TypeError):
            continue
    if model is not None:
        try:
            head_projections(model)
        except ValueError as err:
            raise RecipeError(f"model_name_or_path: {model_name_or_path}: {err}") from None
    return model
