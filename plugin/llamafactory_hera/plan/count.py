"""A recipe's training micro-step counted at its model's full size: the model built from its config under fake tensors
with a few layers, each arm (SFT, HeRA, HeRA with Liger) counted, and every figure scaled linearly to the full depth
from one more decoder layer and one more vision block (every further layer costs what the added one does)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from llamafactory_hera.heads.geometry import parse_head
from llamafactory_hera.plan import counter, step

SPECIAL_BLOCKS = ("deepstack_visual_indexes", "fullatt_block_indexes")
_COUNTED: dict[tuple[str, str], dict[str, float]] = {}
FIGURES = ("flops", "attention", "params", "trainable", "quantizable", "embedding", "vision", "activations",
           "temporaries")


@dataclass(frozen=True)
class Shape:
    """What the micro-step is: rows, their length and image, the adapters, 4-bit or not, Liger, checkpointing."""

    batch: int
    seq: int
    grid_side: int  # image patches per side
    lora_rank: int | None  # None: full fine-tune
    lora_alpha: int
    quantized: bool
    checkpointing: bool
    hera: dict | None = None  # the recipe's hera_* keys and the heads (None: the SFT twin)
    liger: bool = False


def depths(config: Any) -> tuple[str, int, int]:
    """The vision config's depth key, the text depth and the vision depth of ``config``."""
    vision = config.vision_config
    key = "depth" if hasattr(vision, "depth") else "num_hidden_layers"
    return key, config.text_config.num_hidden_layers, getattr(vision, key)


def reduced(config: Any, text_layers: int, vision_depth: int) -> Any:
    """``config`` with ``text_layers`` decoder layers and ``vision_depth`` vision blocks (its DeepStack / full-attention
    block indices moved into the reduced tower, as many as the full one has)."""
    config = copy.deepcopy(config)
    text, vision = config.text_config, config.vision_config
    text.num_hidden_layers = text_layers
    if getattr(text, "layer_types", None):
        text.layer_types = text.layer_types[:text_layers]
    setattr(vision, depths(config)[0], vision_depth)
    for key in SPECIAL_BLOCKS:
        if getattr(vision, key, None):
            setattr(vision, key, list(range(min(len(getattr(vision, key)), vision_depth))))
    for part in (config, text, vision):
        part._attn_implementation = "sdpa"
    return config


def _attention_flops(flops: FlopCounterMode) -> int:
    names = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward")
    return sum(count for op, count in flops.get_flop_counts()["Global"].items() if getattr(op, "__name__", str(op))
               .split(".")[0] in names)


def count(config: Any, shape: Shape) -> dict[str, float]:
    """One micro-step of ``shape`` on ``config`` as it is (no scaling): FLOPs (attention's apart), parameters, and
    the storages the step makes, alive at the forward's end (activations) and the rest of its peak (temporaries).
    Remembered for the process: plan's second look (what would fit) counts only what it has not."""
    key = (config.to_json_string(), repr(shape))
    if key not in _COUNTED:
        _COUNTED[key] = _count(config, shape)
    return _COUNTED[key]


def _count(config: Any, shape: Shape) -> dict[str, float]:
    counter.count_attention()
    data = step.batch(config, shape.batch, shape.seq, shape.grid_side)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = step.build(config)
        step.freeze_vision(model)
        if shape.lora_rank is None:
            for name, param in model.named_parameters():
                param.requires_grad_("visual" not in name)
        else:
            model = step.add_lora(model, shape.lora_rank, shape.lora_alpha)
        linears = [m for name, m in model.named_modules() if type(m) is nn.Linear and "lm_head" not in name
                   and "lora_" not in name]
        if shape.quantized:
            step.quantize_in_place(model)
        step.train_mode(model, shape.checkpointing)
        hera = step.hera_parts(model, shape.hera["heads"], shape.hera) if shape.hera else None
        params = list(model.parameters())
        trainable = [p for p in params if p.requires_grad]
        for param in trainable:  # steady state of gradient accumulation: the gradients exist before the step
            param.grad = torch.zeros_like(param)
        steps = counter.StepCounter(exclude=params + [p.grad for p in trainable])
        with counter.RealIndexMode(), FlopCounterMode(display=False) as flops, steps:
            step.step(model, config, data, steps, hera, liger=shape.liger)
    embeddings = [model.get_input_embeddings().weight, step.output_layer(model).weight]
    return {"flops": flops.get_total_flops(), "attention": _attention_flops(flops),
            "params": sum(p.numel() for p in params), "trainable": sum(p.numel() for p in trainable),
            "quantizable": sum(m.weight.numel() for m in linears),
            "embedding": sum(w.numel() for w in {id(w): w for w in embeddings}.values()),
            "vision": sum(p.numel() for name, p in model.named_parameters() if "visual" in name),
            "activations": steps.at_mark, "temporaries": steps.peak - steps.at_mark}


def base_depths(config: Any, head_layers: int) -> tuple[int, int]:
    """The reduced model's depths: HeRA's head layers (at least one) and one more decoder layer, from which on each
    layer adds the same (HeRA's non-reentrant head layers change the backward's peak until one reentrant layer
    follows them); the vision tower's special blocks."""
    vision = config.vision_config
    special = max((len(getattr(vision, key, None) or []) for key in SPECIAL_BLOCKS), default=0)
    return max(head_layers, 1) + 1, max(special, 1)


def scaled(config: Any, shapes: dict[str, Shape], head_layers: int) -> dict[str, dict[str, float]]:
    """Each arm of ``shapes`` counted on the reduced model (:func:`base_depths`), plus one more decoder layer's and one
    more vision block's increments times the layers it leaves out, both counted on the last arm: a layer without
    heads and the frozen tower run alike in every arm (Liger and 4 bits change the output layer, the loss and each
    layer's passing temporaries, not what a layer adds)."""
    _, full_l, full_v = depths(config)
    base_l, base_v = (min(b, f) for b, f in zip(base_depths(config, head_layers), (full_l, full_v), strict=True))
    base = {arm: count(reduced(config, base_l, base_v), shape) for arm, shape in shapes.items()}
    last = list(shapes)[-1]
    more_l = count(reduced(config, base_l + 1, base_v), shapes[last]) if full_l > base_l else base[last]
    more_v = count(reduced(config, base_l, base_v + 1), shapes[last]) if full_v > base_v else base[last]
    result = {}
    for arm, counts in base.items():
        result[arm] = {key: counts[key] + (full_l - base_l) * (more_l[key] - base[last][key])
                       + (full_v - base_v) * (more_v[key] - base[last][key]) for key in FIGURES}
        result[arm]["layer"] = more_l["params"] - base[last]["params"]  # one decoder layer's parameters
    return result


def head_layers(heads: Any, num_heads: int) -> tuple[list[str], int]:
    """HeRA's heads moved into layers 0, 1, ... of the reduced model, and their layers' count; ``auto``: the
    selection's ``num_heads`` heads, taken as all in one layer (which layers it picks is known only after it ran)."""
    if not isinstance(heads, list):
        return [f"L0H{index}" for index in range(num_heads)], 1
    refs = [parse_head(h) for h in heads]
    layers = sorted({ref.layer for ref in refs})
    return [f"L{layers.index(ref.layer)}H{ref.head}" for ref in refs], len(layers)


def grid_side(config: Any, max_pixels: int) -> int:
    """Patches per side of the largest square image of ``max_pixels`` the processor keeps (merged patches whole)."""
    vision = config.vision_config
    unit = vision.patch_size * vision.spatial_merge_size
    return max(1, math.isqrt(max_pixels) // unit) * vision.spatial_merge_size
