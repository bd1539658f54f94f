"""Where a decoder's heads live: the one place that knows model architectures.

Layer kinds: softmax self-attention with a per-head output projection (``o_proj``; LFM2's ``out_proj``), linear
attention (Qwen3.5's Gated DeltaNet), short convolutions (LFM2), cross-attention (Llama-3.2-Vision), any of them maybe
reading an earlier layer's keys and values (Gemma 3n / 4). Only softmax self-attention layers have heads.

Two views, held equal by a test on every family the suite builds: the config's (:func:`plan_layers`) and a loaded
model's (:func:`decoder_layers`)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from llamafactory_hera.runtime.errors import RecipeError

if TYPE_CHECKING:
    from torch import nn


class LayerKind(StrEnum):
    ATTENTION = "softmax attention"
    LINEAR = "linear attention"
    CONVOLUTION = "convolution"
    CROSS = "cross-attention"
    OTHER = "no attention"


@dataclass(frozen=True)
class LayerPlan:
    """``kv_source``: the layer whose keys and values it reads (its own ``k_proj`` / ``v_proj`` then do nothing)."""

    index: int
    kind: LayerKind
    kv_source: int | None = None
    head_dim: int | None = None  # one head's width (Gemma 4's global layers: wider)

    @property
    def has_heads(self) -> bool:
        return self.kind is LayerKind.ATTENTION


@dataclass(frozen=True)
class DecoderLayer(LayerPlan):
    """``output`` / ``value`` are None without softmax self-attention (``value`` also without ``v_proj``)."""

    module: nn.Module | None = None
    output: nn.Module | None = None
    value: nn.Module | None = None
    plain_linear: bool = False  # both nn.Linear (RAH-LoRA edits slices)


def _kind_of_type(layer_type: str) -> LayerKind:
    name = str(layer_type).lower()
    if "linear" in name:
        return LayerKind.LINEAR
    if "conv" in name:
        return LayerKind.CONVOLUTION
    if "cross" in name:
        return LayerKind.CROSS
    return LayerKind.ATTENTION if "attention" in name else LayerKind.OTHER


def plan_layers(config: Any) -> list[LayerPlan]:
    text = config.get_text_config()
    count = int(text.num_hidden_layers)
    types = list(getattr(text, "layer_types", None) or [])
    kinds = [_kind_of_type(t) for t in types] if len(types) == count else [LayerKind.ATTENTION] * count
    for index in getattr(text, "cross_attention_layers", None) or []:
        if 0 <= int(index) < count:
            kinds[int(index)] = LayerKind.CROSS
    base_dim = int(getattr(text, "head_dim", None) or int(text.hidden_size) // int(text.num_attention_heads))
    wide = getattr(text, "global_head_dim", None)  # Gemma 4's full-attention layers
    dims = [int(wide) if wide and types and types[i] == "full_attention" else base_dim for i in range(count)]
    sources = _kv_sources(text)
    return [
        LayerPlan(i, kinds[i], sources[i], dims[i] if kinds[i] is LayerKind.ATTENTION else None) for i in range(count)
    ]


def _kv_sources(text: Any) -> list[int | None]:
    """Gemma 3n / 4: each of the last ``num_kv_shared_layers`` reads the last earlier layer of its type."""
    count = int(text.num_hidden_layers)
    types = list(getattr(text, "layer_types", None) or [])
    shared = int(getattr(text, "num_kv_shared_layers", 0) or 0)
    first_shared = count - shared
    sources: list[int | None] = [None] * count
    if 0 < shared < count:
        for index in range(first_shared, count):
            same = [i for i in range(first_shared) if len(types) != count or types[i] == types[index]]
            sources[index] = same[-1] if same else None
    return sources


def text_decoder(model: nn.Module) -> nn.Module:
    """Follows nested decoders (Llama 4's ``get_decoder()`` is a causal LM whose ``model`` holds them)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    for _ in range(3):  # a causal LM inside: one level down
        if decoder is None or getattr(decoder, "layers", None) is not None:
            break
        inner = decoder.get_decoder() if hasattr(decoder, "get_decoder") else None
        inner = getattr(decoder, "model", None) if inner is None or inner is decoder else inner
        decoder = None if inner is decoder else inner
    if getattr(decoder, "layers", None) is None:
        raise RecipeError(
            f"{type(base).__name__} has no text decoder with `layers` (looked at get_decoder().layers and one level "
            "down); llamafactory-hera needs decoder layers whose attention has a per-head output projection "
            "(self_attn.o_proj)."
        )
    return decoder


def _loaded_layer(index: int, layer: nn.Module) -> DecoderLayer:
    from torch import nn  # lazy: the config view needs no torch

    attention = getattr(layer, "self_attn", None)
    output = next(
        (
            module
            for module in (getattr(attention, name, None) for name in ("o_proj", "out_proj"))
            if isinstance(module, nn.Module)
        ),
        None,
    )
    if attention is not None and output is not None:
        shared = bool(getattr(attention, "is_kv_shared_layer", False))
        source = getattr(attention, "kv_shared_layer_index", None) if shared else None
        if shared and source is None and getattr(attention, "config", None) is not None:
            source = _kv_sources(attention.config)[index]  # transformers >= 5.8 keeps no index
        head_dim = getattr(attention, "head_dim", None)
        value = getattr(attention, "v_proj", None)
        return DecoderLayer(
            index,
            LayerKind.ATTENTION,
            source if shared else None,
            int(head_dim) if head_dim else None,
            layer,
            output,
            value,
            isinstance(value, nn.Linear) and isinstance(output, nn.Linear),
        )
    kind = next(
        (
            kind
            for name, kind in (
                ("cross_attn", LayerKind.CROSS),
                ("linear_attn", LayerKind.LINEAR),
                ("conv", LayerKind.CONVOLUTION),
            )
            if hasattr(layer, name)
        ),
        LayerKind.OTHER,
    )
    return DecoderLayer(index, kind, None, None, layer)


def decoder_layers(model: nn.Module) -> list[DecoderLayer]:
    return [_loaded_layer(index, layer) for index, layer in enumerate(text_decoder(model).layers)]


def head_projections(model: nn.Module) -> dict[int, nn.Module]:
    """The LoRA layer when LoRA targets ``o_proj``; refused when no layer has heads."""
    layers = decoder_layers(model)
    found = {layer.index: layer.output for layer in layers if layer.has_heads and layer.output is not None}
    if not found:
        raise RecipeError(
            f"{type(model).__name__}: no decoder layer has softmax self-attention with a per-head output "
            f"projection ({describe(layers)}); llamafactory-hera splits that projection by head and "
            "cannot run on this architecture."
        )
    return found


def trainable_upstream(model: nn.Module, layers: list[int]) -> dict[int, bool]:
    """Per layer, whether a trainable parameter feeds its ``o_proj`` input."""
    decoder = text_decoder(model)
    decoder_layers = list(decoder.layers)
    in_layers = {id(p) for layer in decoder_layers for p in layer.parameters()}
    norm = getattr(decoder, "norm", None)
    after = {id(p) for p in norm.parameters()} if norm is not None else set()
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inputs = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    input_ids = {id(p) for p in inputs.parameters()} if inputs is not None else set()
    if output is not None:
        after |= {id(p) for p in output.parameters() if id(p) not in input_ids}  # tied weights feed the input
    outside = any(p.requires_grad for p in model.parameters() if id(p) not in in_layers and id(p) not in after)
    result: dict[int, bool] = {}
    for index in layers:
        earlier = any(p.requires_grad for layer in decoder_layers[:index] for p in layer.parameters())
        own = any(
            p.requires_grad
            for name, p in decoder_layers[index].named_parameters()
            if (name.startswith("self_attn.") and not name.startswith("self_attn.o_proj."))
            or name.startswith("input_layernorm.")
        )
        result[index] = outside or earlier or own
    return result


def per_head_value_layers(plans: list[LayerPlan], head_dim: int | None = None) -> tuple[list[int], dict[int, str]]:
    """(RAH-LoRA's calibratable layers, the others -> why not): layers with heads, not KV-shared (a V update would be
    void), plain ``nn.Linear`` v/o projections, heads of width ``head_dim`` if given."""
    kept = []
    left = {}
    for plan in plans:
        if not plan.has_heads:
            left[plan.index] = f"{plan.kind}, no heads"
        elif plan.kv_source is not None:
            left[plan.index] = f"reads the keys and values of L{plan.kv_source}"
        elif head_dim is not None and plan.head_dim is not None and plan.head_dim != head_dim:
            left[plan.index] = f"heads of width {plan.head_dim}, not the model's {head_dim}"
        elif isinstance(plan, DecoderLayer) and not plan.plain_linear:
            left[plan.index] = "no plain Linear v_proj and output projection"
        else:
            kept.append(plan.index)
    return kept, left


def kv_sharing_chains(plans: list[LayerPlan]) -> dict[int, list[int]]:
    """Source layer -> its readers, which get keys and values outside a checkpointed call's input."""
    chains: dict[int, list[int]] = {}
    for plan in plans:
        if plan.kv_source is not None:
            chains.setdefault(plan.kv_source, []).append(plan.index)
    return chains


def head_layers(plans: list[LayerPlan]) -> list[int]:
    return [plan.index for plan in plans if plan.has_heads]


def describe(plans: list[LayerPlan]) -> str:
    """``L0-L2 linear attention, L3 softmax attention, ...`` (KV sharing named)."""
    runs: list[tuple[int, int, str]] = []
    for plan in plans:
        what = str(plan.kind) + (f" (keys and values of L{plan.kv_source})" if plan.kv_source is not None else "")
        if runs and runs[-1][2] == what and runs[-1][1] == plan.index - 1:
            runs[-1] = (runs[-1][0], plan.index, what)
        else:
            runs.append((plan.index, plan.index, what))
    return ", ".join((f"L{a}" if a == b else f"L{a}-L{b}") + f" {what}" for a, b, what in runs)


def layer_list(indices: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``L0-L2, L5``."""
    runs: list[list[int]] = []
    for index in indices:
        if runs and runs[-1][-1] == index - 1:
            runs[-1].append(index)
        else:
            runs.append([index])
    return ", ".join(f"L{r[0]}" if len(r) == 1 else f"L{r[0]}-L{r[-1]}" for r in runs) or "none"
