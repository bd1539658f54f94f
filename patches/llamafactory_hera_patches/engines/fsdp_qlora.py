"""bitsandbytes 4-bit weights kept bit for bit through accelerate's FSDP2 upcast, for every stage (stock ones included).

accelerate's ``fsdp2_prepare_model`` upcasts every non-float32 parameter to float32 after ``fully_shard``, the packed
4-bit codes (stored as bf16 values) included, and FSDP2's bf16 all-gather then rewrites every NaN-shaped pair of bytes:
what is lost and how much is docs/configurations.md (N14, N19). This patch keeps every 4-bit weight out of any dtype
conversion the preparation makes (every ``.to`` / ``.float`` / ``.half`` goes through ``Module._apply``, guarded for
the call), then refuses what the forward would still convert: a weight no longer in its storage dtype, an all-gather
dtype other than that one (:func:`check_codes_reach_the_forward`), and at each 4-bit layer's first forward codes whose
checksum changed by any path (:func:`check_at_first_forward`).

Applied by the import hook right after ``accelerate.utils.fsdp_utils`` executes, before ``accelerate.utils`` and the
Accelerator bind the function, on every accelerate that has ``fsdp2_prepare_model``.
"""

from __future__ import annotations

import functools
import sys
from types import ModuleType
from typing import Any

from llamafactory_hera.runtime.errors import RecipeError


def _4bit_layers(model: Any) -> list[Any]:
    """Every bitsandbytes 4-bit layer of ``model`` (none when bitsandbytes is not imported: then the model holds no
    such layer). PEFT's LoRA wrapper of one shares its class name, not its class."""
    bitsandbytes = sys.modules.get("bitsandbytes")
    if bitsandbytes is None:
        return []
    return [module for module in model.modules() if isinstance(module, bitsandbytes.nn.Linear4bit)]


def packed_4bit_weights(model: Any) -> dict[int, Any]:
    """``id -> weight`` of every bitsandbytes 4-bit layer's weight in ``model``."""
    return {id(module.weight): module.weight for module in _4bit_layers(model)}


def check_codes_reach_the_forward(model: Any, param_dtype: Any) -> None:
    """Raise when a 4-bit weight of the prepared ``model`` is no longer in its packed storage dtype, or when FSDP2's
    all-gather (``param_dtype``, None without mixed precision) would cast it: either way the forward would read the
    codes converted as numbers, not as the bytes they are. (A 4-bit layer in the accelerate config's
    ``ignored_modules``, never gathered, is checked too: a refusal there would be false; no run here ignores one.)"""
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
    """The refusal of 4-bit codes that FSDP2 would convert as numbers: ``what`` they are, ``gathered`` the dtype the
    all-gather converts them to (here after loading, and predicted before loading by fsdp_loading)."""
    return (
        f"4-bit weights under FSDP2: the codes {what}, which converts them as numbers at every forward (every "
        "weight would be wrong). The codes are stored in the dtype LLaMA-Factory loads the model in (bf16: true or "
        "fp16: true in the recipe, else the checkpoint's dtype; a checkpoint saved 4-bit keeps its "
        f"bnb_4bit_quant_storage): set the recipe's bf16: true or fp16: true to match {gathered}, or "
        "mixed_precision: 'no' in the accelerate config."
    )


def apply_keeping_codes(model: Any, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``Module._apply`` of ``model`` with ``fn``, but each 4-bit weight (:func:`packed_4bit_weights`, read now: after
    ``fully_shard`` they are the registered shards) that ``fn`` would give another dtype is kept as it is, moved to
    the device ``fn`` moves it to. FSDP2's own ``_apply`` resets its sharded parameters after the conversion."""
    kept = packed_4bit_weights(model)

    def keep(tensor: Any) -> Any:
        out = fn(tensor)
        return tensor.to(out.device) if id(tensor) in kept and out.dtype != tensor.dtype else out

    return type(model)._apply(model, keep, *args, **kwargs)


def checksum(codes: Any, chunk: int = 1 << 24) -> tuple[int, ...]:
    """The sum of the bytes of ``codes`` and their sum weighted by position (int64, wrapping alike), on the codes' own
    device in chunks of ``chunk`` bytes: one host read of two numbers, no copy of a 70B model's codes to the host."""
    import torch  # lazy: the patches load at every start-up

    data = codes.data.contiguous().view(torch.uint8).flatten()
    sums = torch.zeros(2, dtype=torch.int64, device=data.device)
    for start in range(0, data.numel(), chunk):
        part = data[start : start + chunk].to(torch.int64)
        sums[0] += part.sum()
        sums[1] += (part * torch.arange(start + 1, start + 1 + part.numel(), device=data.device)).sum()
    return tuple(sums.tolist())


def check_at_first_forward(model: Any) -> None:
    """A pre-forward hook on each 4-bit layer of ``model`` (before its preparation) that, once, compares the checksum
    of the codes its forward gets with the one taken now, and refuses the layer by name if they differ."""
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
    # checked first, so that a later accelerate renaming the function never fails a LLaMA-Factory process
    if not hasattr(fsdp_utils, "fsdp2_prepare_model"):
        return
    original = fsdp_utils.fsdp2_prepare_model

    @functools.wraps(original)
    def fsdp2_prepare_model(accelerator: Any, model: Any) -> Any:
        if not packed_4bit_weights(model):
            return original(accelerator, model)
        check_at_first_forward(model)
        model._apply = functools.partial(apply_keeping_codes, model)  # for this call: .to, .float, ... go through it
        try:
            prepared = original(accelerator, model)
        finally:
            del model._apply
        policy = accelerator.state.fsdp_plugin.mixed_precision_policy  # None without mixed precision
        check_codes_reach_the_forward(prepared, None if policy is None else policy.param_dtype)
        return prepared

    fsdp_utils.fsdp2_prepare_model = fsdp2_prepare_model
    # accelerate.utils and accelerate.accelerator bind the name at their import: where they were imported before this
    # patch ran (a program that imported accelerate before LLaMA-Factory), Accelerator.prepare calls their copy
    for name in ("accelerate.utils", "accelerate.accelerator"):
        module = sys.modules.get(name)
        if getattr(module, "fsdp2_prepare_model", None) is original:
            module.fsdp2_prepare_model = fsdp2_prepare_model
