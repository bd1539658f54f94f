"""RAH-LoRA's calibration as a standard PEFT LoRA adapter (scaling 1, dropout 0) on the touched modules only.

For targets j = 1..m of one module with ``Delta_j = alpha_j U_j diag(S_j) Vh_j``, ``lora_A`` stacks
``sqrt(S_j) Vh_j`` and ``lora_B`` places ``alpha_j U_j sqrt(S_j)``. Module names are the language model's exact ones:
a bare ``v_proj`` would also match the vision tower's.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from llamafactory_hera.rah.calibrate import Calibration, Geometry
from llamafactory_hera.rah.overlay import Step, WeightOverlay, joined, module_step
from llamafactory_hera.rah.update import lora_pair
from llamafactory_hera.runtime.errors import RecipeError


def lora_factors(
    calibration: Calibration, model: nn.Module, geometry: Geometry
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Exact module name -> (A ``[R, in]``, B ``[out, R]``), float32, for every module a kept update touches."""
    names = {id(module): name for name, module in model.named_modules()}
    modules = calibration.plan.modules
    pieces: dict[str, list[Step]] = {}
    for update in calibration.updates:
        if not update.calibrated:
            continue
        attention = modules[update.layer]
        for kind, (u, s, vh) in update.factors.items():
            linear = attention.value if kind == "v" else attention.output
            b_head, a_head = lora_pair(u, s, vh, update.region.alpha)  # the B @ A the trust region applied
            b, a = module_step(kind, b_head.cpu(), a_head.cpu(), update.head, geometry, linear)
            pieces.setdefault(names[id(linear)], []).append((b, a))
    return {name: joined(parts)[::-1] for name, parts in pieces.items()}


def save_adapter(
    model: nn.Module,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    output_dir: str | Path,
    base_name: str | None = None,
    dora: bool = False,
    overlay: WeightOverlay | None = None,
) -> list[str]:
    """Write the adapter (PEFT's ``save_pretrained``); return the target names; ``model`` is left unchanged. ``dora``
    writes a DoRA adapter of the same calibration: ``m``, the calibrated weight's row norms, makes PEFT's
    ``diag(m / ||W + BA||_row) (W + BA)`` equal ``W + BA``."""
    if not factors:
        raise RecipeError(
            "RAH-LoRA: no head was calibrated (every target rolled back or none was found); there is "
            "no adapter to write."
        )
    ranks = {name: a.shape[0] for name, (a, _) in factors.items()}
    config = LoraConfig(
        r=max(ranks.values()),
        lora_alpha=max(ranks.values()),
        lora_dropout=0.0,
        target_modules=sorted(factors),
        rank_pattern=ranks,
        alpha_pattern=dict(ranks),
        bias="none",
        base_model_name_or_path=base_name,
        use_dora=dora,
    )
    peft_model = get_peft_model(model, config)
    try:
        for name, (a, b) in factors.items():
            layer = peft_model.base_model.model.get_submodule(name)
            if layer.scaling["default"] != 1.0:
                raise RuntimeError(f"RAH-LoRA: PEFT gave {name} scaling {layer.scaling['default']}, expected 1.")
            values = {layer.lora_A["default"]: a, layer.lora_B["default"]: b}
            if dora:  # m = ||W + BA||_row (an offloaded weight is read from its offload map)
                calibrated = (overlay or WeightOverlay()).current(layer.base_layer).float()
                values[layer.lora_magnitude_vector["default"]] = torch.linalg.norm(calibrated, dim=1)
            for module, value in values.items():  # new CPU tensors: PEFT makes them on the base layer's device,
                # meta for an offloaded one, which holds nothing to copy into or save
                module.weight = nn.Parameter(value.to("cpu", module.weight.dtype), requires_grad=False)
        peft_model.save_pretrained(str(output_dir))
    finally:
        peft_model.unload()  # the base model as it came in
    return sorted(factors)
