"""A recipe's micro-step at full model size: each arm counted on a few-layer fake-tensor model, scaled linearly to
full depth."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from llamafactory_hera.heads.geometry import parse_head
from llamafactory_hera.plan import counter, step
from llamafactory_hera.plan.families import part

SPECIAL_BLOCKS = ("deepstack_visual_indexes", "fullatt_block_indexes")
_COUNTED: dict[tuple[str, str], dict[str, float]] = {}
FIGURES = (
    "flops",
    "attention",
    "reference",
    "params",
    "trainable",
    "quantizable",
    "embedding",
    "vision",
    "activations",
    "temporaries",
    "ops",
)


@dataclass(frozen=True)
class Shape:
    """The micro-step :func:`step.step` counts."""

    batch: int
    seq: int
    max_pixels: int  # each row's image: a square of this many pixels
    lora_rank: int | None  # None: full fine-tune
    lora_alpha: int
    quantized: bool
    checkpointing: bool
    hera: dict | None = None  # the recipe's hera_* keys and the heads (None: the SFT twin)
    liger: bool = False
    parts: tuple[str, ...] = ("language",)  # a full fine-tune's trained parts (families.part)
    reference_rows: int = 0
    probe: str | None = None


def depths(config: Any) -> tuple[str, int, int]:
    """The vision depth key, text depth and vision depth (0: a text model)."""
    vision = getattr(config, "vision_config", None)
    key = "depth" if hasattr(vision, "depth") else "num_hidden_layers"
    return key, config.get_text_config().num_hidden_layers, getattr(vision, key, 0)


def layer_types(config: Any) -> list[str]:
    """Each decoder layer's kind (``layer_types``: sliding, full or linear attention), one kind if none."""
    text = config.get_text_config()
    return list(getattr(text, "layer_types", None) or ["layer"] * text.num_hidden_layers)


def reduced(config: Any, types: list[str], vision_depth: int, attention: str = "sdpa") -> Any:
    """``config`` with layers of ``types`` and ``vision_depth`` blocks (special block indices moved in)."""
    config = copy.deepcopy(config)
    text = config.get_text_config()
    vision = getattr(config, "vision_config", None)
    text.num_hidden_layers = len(types)
    if getattr(text, "layer_types", None):
        text.layer_types = list(types)
    if vision is not None:
        setattr(vision, depths(config)[0], vision_depth)
        for key in SPECIAL_BLOCKS:
            if getattr(vision, key, None):
                setattr(vision, key, list(range(min(len(getattr(vision, key)), vision_depth))))
    for item in (config, text, vision):
        if item is not None:
            item._attn_implementation = attention
    return config


def _attention_flops(flops: counter.StepFlops) -> int:
    names = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward")
    return sum(
        count
        for op, count in flops.get_flop_counts()["Global"].items()
        if getattr(op, "__name__", str(op)).split(".")[0] in names
    )


def count(config: Any, shape: Shape) -> dict[str, float]:
    """One unscaled micro-step's figures (:data:`FIGURES`); cached for plan's second look."""
    key = (config.to_json_string(), repr(shape))
    if key not in _COUNTED:
        _COUNTED[key] = _count(config, shape)
    return _COUNTED[key]


def _count(config: Any, shape: Shape) -> dict[str, float]:
    counter.count_attention()
    data = step.batch(config, shape.batch, shape.seq, shape.max_pixels)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = step.build(config)
        if shape.lora_rank is None:
            step.set_trainable(model, shape.parts)
        else:
            model = step.add_lora(model, shape.lora_rank, shape.lora_alpha)
        linears = [
            m
            for name, m in model.named_modules()
            if type(m) is nn.Linear and "lm_head" not in name and "lora_" not in name
        ]
        if shape.quantized:
            step.quantize_in_place(model)
        step.train_mode(model, shape.checkpointing)
        hera = step.hera_parts(model, shape.hera["heads"], shape.hera) if shape.hera else None
        params = list(model.parameters())
        trainable = [p for p in params if p.requires_grad]
        for param in trainable:  # gradient accumulation's steady state: gradients exist before the step
            param.grad = torch.zeros_like(param)
        steps = counter.StepCounter(exclude=params + [p.grad for p in trainable])
        with counter.RealIndexMode(), counter.StepFlops() as flops, steps:
            reference = step.step(
                model, data, steps, hera, shape.liger, reference_rows=shape.reference_rows, probe=shape.probe
            )
    embeddings = [model.get_input_embeddings().weight, step.output_layer(model).weight]
    return {
        "flops": flops.get_total_flops(),
        "attention": _attention_flops(flops),
        "reference": reference,
        "params": sum(p.numel() for p in params),
        "trainable": sum(p.numel() for p in trainable),
        "quantizable": sum(m.weight.numel() for m in linears),
        "embedding": sum(w.numel() for w in {id(w): w for w in embeddings}.values()),
        "vision": sum(p.numel() for name, p in model.named_parameters() if part(name) != "language"),
        "activations": steps.at_mark,
        "temporaries": steps.peak - steps.at_mark,
        "ops": steps.ops,
    }


def scaled(config: Any, shapes: dict[str, Shape], head_layers: int) -> dict[str, dict[str, float]]:
    """Each arm on a reduced model: HeRA's head layers, one of the commonest kind (HeRA's non-reentrant layers change
    the backward's peak until a reentrant one follows) and the tower's special blocks; plus, counted on the last arm,
    one more layer of each kind and one more block, times those left out (they cost the same in every arm)."""
    kinds = layer_types(config)
    full_v = depths(config)[2]  # the vision tower's blocks
    vision = getattr(config, "vision_config", None)
    special = max((len(getattr(vision, key, None) or []) for key in SPECIAL_BLOCKS), default=0)
    base_v = min(max(special, 1), full_v)
    head_kind = "full_attention" if "full_attention" in kinds else kinds[0]
    base_types = ([head_kind] * max(head_layers, 1) + [max(kinds, key=kinds.count)])[: len(kinds)]
    attention = "eager" if any(shape.probe == "isal" for shape in shapes.values()) else "sdpa"
    base = {arm: count(reduced(config, base_types, base_v, attention), shape) for arm, shape in shapes.items()}
    last = list(shapes)[-1]
    layers = [
        (
            kinds.count(kind) - base_types.count(kind),
            count(reduced(config, base_types + [kind], base_v, attention), shapes[last]),
        )
        for kind in sorted(set(kinds))
        if kinds.count(kind) > base_types.count(kind)
    ]
    more = list(layers)
    if full_v > base_v:
        more.append((full_v - base_v, count(reduced(config, base_types, base_v + 1, attention), shapes[last])))
    result = {}
    for arm, counts in base.items():
        result[arm] = {
            key: counts[key] + sum(n * (added[key] - base[last][key]) for n, added in more) for key in FIGURES
        }
        result[arm]["layer"] = max([added["params"] - base[last]["params"] for _, added in layers] or [0])
    return result


def head_layers(heads: Any, num_heads: int, per_layer: int = 1) -> tuple[list[str], int]:
    """HeRA's heads moved into layers 0, 1, ..., and their layer count; ``auto``: ``num_heads`` heads packed into the
    fewest layers."""
    if not isinstance(heads, list):
        return [f"L{i // per_layer}H{i % per_layer}" for i in range(num_heads)], -(-num_heads // per_layer)
    refs = [parse_head(head) for head in heads]
    layers = sorted({ref.layer for ref in refs})
    return [f"L{layers.index(ref.layer)}H{ref.head}" for ref in refs], len(layers)
