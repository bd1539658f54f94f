"""bitsandbytes 4-bit weights kept bit for bit through accelerate's FSDP2 upcast, for every stage.

accelerate's ``fsdp2_prepare_model`` upcasts every non-float32 parameter to float32 after ``fully_shard``, the packed
4-bit codes (stored as bf16) included, and FSDP2's bf16 all-gather then rewrites every NaN-shaped pair of bytes
(docs/configurations.md, N14, N19). This patch keeps 4-bit weights out of the preparation's dtype conversions (all go
through ``Module._apply``, guarded for the call), then refuses what the forward would still convert
(:func:`check_codes_reach_the_forward`, :func:`check_at_first_forward`).

Applied right after ``accelerate.utils.fsdp_utils`` executes, before the Accelerator binds the function.
"""

from __future__ import annotations

import functools
import sys
from types import ModuleType
from typing import Any

from llamafactory_hera.runtime.errors import RecipeError


def _4bit_layers(model: Any) -> list[Any]:
    """Every bitsandbytes 4-bit layer (none if bitsandbytes is not imported). PEFT's LoRA wrapper of one shares its
    class name, not its class."""
    bitsandbytes = sys.modules.get("bitsandbytes")
    if bitsandbytes is None:
        return []
    return [module for module in model.modules() if isinstance(module, bitsandbytes.nn.Linear4bit)]


def packed_4bit_weights(model: Any) -> dict[int, Any]:
    """``id -> weight`` of every 4-bit layer's weight."""
    return {id(module.weight): module.weight for module in _4bit_layers(model)}


def check_codes_reach_the_forward(model: Any, param_dtype: Any) -> None:
    """Raise if a prepared 4-bit weight left its storage dtype, or FSDP2's all-gather (``param_dtype``, None without
    mixed precision) would cast it. (A layer in ``ignored_modules``, never gathered, is checked too, falsely; no run
    here ignores one.)"""
    for module in _4bit_layers(model):
        storage = module.quant_storage
        stored = module.weight.dtype
        if stored == storage and param_dtype in (None, storage):
            continue
        what = (
            f"are {stored}, not their packed storage {storage}"
            if stored != storage
            else f"are stored as {storage} and the accelerate config's mixed precision gathers them as {param_dtype}"
        )
        raise RecipeError(cast_codes_message(what, param_dtype))


def cast_codes_message(what: str, gathered: Any) -> str:
    """Refusal of 4-bit codes FSDP2 would convert as numbers (after loading, and before it by fsdp_loading)."""
    return (
        f"4-bit weights under FSDP2: the codes {what}, which converts them as numbers at every forward (every "
        "weight would be wrong). The codes are stored in the dtype LLaMA-Factory loads the model in (bf16: true or "
        "fp16: true in the recipe, else the checkpoint's dtype; a checkpoint saved 4-bit keeps its "
        f"bnb_4bit_quant_storage): set the recipe's bf16: true or fp16: true to match {gathered}, or "
        "mixed_precision: 'no' in the accelerate config."
    )


def apply_keeping_codes(model: Any, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``Module._apply`` with ``fn``, but a 4-bit weight (read now: after ``fully_shard``, the shards) ``fn`` would
    give another dtype is only moved to ``fn``'s device. FSDP2's ``_apply`` resets its sharded parameters after."""
    kept = packed_4bit_weights(model)

    def keep(tensor: Any) -> Any:
        out = fn(tensor)
        return tensor.to(out.device) if id(tensor) in kept and out.dtype != tensor.dtype else out

    return type(model)._apply(model, keep, *args, **kwargs)


def checksum(codes: Any, chunk: int = 1 << 24) -> tuple[int, ...]:
    """(byte sum, position-weighted byte sum) of ``codes``, on their device: no copy of a 70B model's codes to the
    host."""
    import torch  # lazy: patches load at every start-up

    data = codes.data.contiguous().view(torch.uint8).flatten()
    sums = torch.zeros(2, dtype=torch.int64, device=data.device)
    for start in range(0, data.numel(), chunk):
        part = data[start : start + chunk].to(torch.int64)
        sums[0] += part.sum()
        sums[1] += (part * torch.arange(start + 1, start + 1 + part.numel(), device=data.device)).sum()
    return tuple(sums.tolist())


def check_at_first_forward(model: Any) -> None:
    """Hook each 4-bit layer (before preparation) to compare, once, its first forward's code checksum with the one
    taken now; a change is refused by layer name."""
    quantized = {id(layer) for layer in _4bit_layers(model)}
    for name, layer in model.named_modules():
        if id(layer) in quantized:
            hooks: list[Any] = []

            def check(
                module: Any,
                args: Any,
                name: str = name,
                loaded: tuple[int, ...] = checksum(layer.weight),
                hooks: list[Any] = hooks,
            ) -> None:
                hooks.pop().remove()
                if checksum(module.weight) != loaded:
                    raise RecipeError(
                        f"4-bit weights under FSDP2: the codes of {name} at its first forward are not "
                        "those loaded: accelerate's preparation converted them as numbers (every weight "
                        "would be wrong). Set mixed_precision: 'no' in the accelerate config, or train "
                        "this model without FSDP."
                    )

            hooks.append(layer.register_forward_pre_hook(check))


def apply(fsdp_utils: ModuleType) -> None:
    # checked first: a later accelerate renaming it never fails a host process
    if not hasattr(fsdp_utils, "fsdp2_prepare_model"):
        return
    original = fsdp_utils.fsdp2_prepare_model

    @functools.wraps(original)
    def fsdp2_prepare_model(accelerator: Any, model: Any) -> Any:
        if not packed_4bit_weights(model):
            return original(accelerator, model)
        check_at_first_forward(model)
        model._apply = functools.partial(apply_keeping_codes, model)  # for this call
        try:
            prepared = original(accelerator, model)
        finally:
            del model._apply
        policy = accelerator.state.fsdp_plugin.mixed_precision_policy  # None without mixed precision
        check_codes_reach_the_forward(prepared, None if policy is None else policy.param_dtype)
        return prepared

    fsdp_utils.fsdp2_prepare_model = fsdp2_prepare_model
    # accelerate.utils and accelerate.accelerator bind the name at import: if imported before this patch ran,
    # Accelerator.prepare calls their copy
    for name in ("accelerate.utils", "accelerate.accelerator"):
        module = sys.modules.get(name)
        if getattr(module, "fsdp2_prepare_model", None) is original:
            module.fsdp2_prepare_model = fsdp2_prepare_model
