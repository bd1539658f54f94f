"""Where head selection holds its model: whole on the scoring device when it fits there, else split by accelerate
between the device and the CPU's RAM (an offloaded layer is copied to the device for its forward, every batch);
refused before any weight loads when the two together cannot hold it. Sizes from the config alone (a meta-device
model), so a 70B checkpoint is judged without reading its weights.
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate.utils import compute_module_sizes, infer_auto_device_map

from llamafactory_hera.heads.architecture import head_projections
from llamafactory_hera.log import show
from llamafactory_hera_patches.errors import RecipeError

HEADROOM = 0.9  # of what is free: the batch's activations, the allocator's blocks, the loader's transient copies


def gb(size: float) -> str:
    """Bytes as decimal GB, as checkpoints' sizes are quoted."""
    return f"{size / 1e9:.1f} GB"


def plan_memory(model_bytes: int, reserve: int, free: dict[Any, int]) -> dict[Any, int] | None:
    """accelerate's ``max_memory`` for the model: None when ``model_bytes`` fits the first place of ``free`` (the
    scoring device: loaded whole), else every place's budget in order: ``HEADROOM`` of its free bytes, less
    ``reserve`` on the CPU (the float32 o_proj weights scoring copies there). The budgets may hold less than the model:
    the caller refuses it."""
    budgets = {place: int(size * HEADROOM) - (reserve if place == "cpu" else 0) for place, size in free.items()}
    first, *_ = budgets
    return None if model_bytes <= budgets[first] else budgets


def free_memory(device: str) -> dict[Any, int]:
    """Free bytes of the scoring device (a CUDA index, as accelerate names it) and of the CPU's RAM, in that order."""
    import psutil  # lazy: an accelerate dependency, only when selection loads a model

    ram = psutil.virtual_memory().available
    parsed = torch.device(device)
    if parsed.type != "cuda":
        return {"cpu": ram}
    index = torch.cuda.current_device() if parsed.index is None else parsed.index
    return {index: torch.cuda.mem_get_info(index)[0], "cpu": ram}


def scoring_device_map(meta: torch.nn.Module, model_name: str, device: str, dtype: str) -> dict[str, Any] | None:
    """The ``device_map`` selection loads ``meta``'s checkpoint with (None: whole on ``device``), said in one line;
    a RecipeError naming the bytes needed where the device and the RAM cannot hold it."""
    if getattr(meta.config, "quantization_config", None):  # saved quantized: its sizes are not the config's dtype's
        show(f"head selection: {model_name} is saved quantized; it loads whole on {device}, as LLaMA-Factory loads it.")
        return None
    sizes = compute_module_sizes(meta, dtype=getattr(torch, dtype))
    model_bytes = sizes[""]
    reserve = 4 * sum(o_proj.weight.numel() for o_proj in head_projections(meta).values())
    free = free_memory(device)
    budgets = plan_memory(model_bytes, reserve, free)
    if budgets is None:
        show(f"head selection: the model is {gb(model_bytes)} in {dtype}; it fits whole on {device} "
             f"({gb(next(iter(free.values())))} free).")
        return None
    device_map = {"": "disk"}  # accelerate's last resort, which selection does not take
    if sum(budgets.values()) >= model_bytes:
        device_map = infer_auto_device_map(meta, max_memory=budgets, dtype=getattr(torch, dtype),
                                           no_split_module_classes=list(getattr(meta, "_no_split_modules", None) or []))
    if any(at not in budgets for at in device_map.values()):
        raise RecipeError(
            f"model_name_or_path: {model_name}: head selection needs {gb(model_bytes)} for the model in {dtype} and "
            f"{gb(reserve)} of CPU RAM for its o_proj weights in float32, {HEADROOM:.0%} of the free memory usable: "
            + ", ".join(f"{_name(place)} has {gb(size)}" for place, size in free.items())
            + ". Free memory, select on a machine with more (llamafactory-hera select RECIPE) and list its heads in "
            "hera_heads, or set quantization_bit: 4.")
    placed = {place: sum(sizes[name] for name, at in device_map.items() if at == place) for place in budgets}
    show(f"head selection: the model is {gb(model_bytes)} in {dtype}, more than {device} holds: "
         + ", ".join(f"{gb(size)} on {_name(place)}" for place, size in placed.items())
         + f" (offloaded: each batch copies the CPU's layers to {device}, one at a time).")
    return device_map


def _name(place: Any) -> str:
    return f"cuda:{place}" if isinstance(place, int) else place
