"""Where a decoder's heads live: the one place that knows model architectures.

A text decoder is a stack of layers of a few kinds (:class:`LayerKind`): softmax self-attention with a per-head
output projection (``o_proj``, ``out_proj`` in LFM2), linear attention (Qwen3.5's Gated DeltaNet), short
convolutions (LFM2), cross-attention to the image (Llama-3.2-Vision), each possibly reading its keys and values from
an earlier layer (Gemma 3n / Gemma 4's KV sharing). Only softmax self-attention layers have heads in HeRA's sense
(a per-head block of ``o_proj``'s input); layer indices are always the model's own decoder-layer indices.

Two views that agree (a test holds them together on every family the suite builds):
- before loading, from the config: :func:`plan_layers` (``layer_types``, ``cross_attention_layers``,
  ``num_kv_shared_layers``);
- after loading, from the modules of a plain, PEFT-wrapped or unwrapped DDP / DeepSpeed model: :func:`text_decoder`
  (nested decoders as Llama 4's included) and :func:`decoder_layers`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from llamafactory_hera.runtime.errors import RecipeError

if TYPE_CHECKING:
    from torch import nn


class LayerKind(StrEnum):
    """What mixes tokens in a decoder layer."""

    ATTENTION = "softmax attention"
    LINEAR = "linear attention"
    CONVOLUTION = "convolution"
    CROSS = "cross-attention"
    OTHER = "no attention"


@dataclass(frozen=True)
class LayerPlan:
    """One decoder layer as its config describes it: its kind and, for a KV-shared layer, the layer whose keys and
    values it reads (its own ``k_proj`` / ``v_proj``, where it has them, do nothing)."""

    index: int
    kind: LayerKind
    kv_source: int | None = None
    head_dim: int | None = None  # layers with heads: the width of one head (Gemma 4's global layers: wider)

    @property
    def has_heads(self) -> bool:
        """True for softmax self-attention: per-head blocks of the output projection's input."""
        return self.kind is LayerKind.ATTENTION


@dataclass(frozen=True)
class DecoderLayer(LayerPlan):
    """One loaded decoder layer: its plan plus the modules. ``output`` / ``value``: the attention's output and value
    projections (``None`` where the layer has no softmax self-attention, ``value`` also where it has no ``v_proj``)."""

    module: nn.Module | None = None
    output: nn.Module | None = None
    value: nn.Module | None = None
    plain_linear: bool = False  # value and output projections are plain nn.Linear (RAH-LoRA edits their slices)


def _kind_of_type(layer_type: str) -> LayerKind:
    """``layer_types`` entry -> kind: full / sliding / chunked attention are softmax attention."""
    name = str(layer_type).lower()
    if "linear" in name:
        return LayerKind.LINEAR
    if "conv" in name:
        return LayerKind.CONVOLUTION
    if "cross" in name:
        return LayerKind.CROSS
    return LayerKind.ATTENTION if "attention" in name else LayerKind.OTHER


def plan_layers(config: Any) -> list[LayerPlan]:
    """Every decoder layer's :class:`LayerPlan`, read from an (M)LLM config (no weight loaded)."""
    text = config.get_text_config()
    count = int(text.num_hidden_layers)
    types = list(getattr(text, "layer_types", None) or [])
    kinds = [_kind_of_type(t) for t in types] if len(types) == count else [LayerKind.ATTENTION] * count
    for index in getattr(text, "cross_attention_layers", None) or []:
        if 0 <= int(index) < count:
            kinds[int(index)] = LayerKind.CROSS
    base_dim = int(getattr(text, "head_dim", None) or int(text.hidden_size) // int(text.num_attention_heads))
    wide = getattr(text, "global_head_dim", None)  # Gemma 4: full-attention layers use heads of this width
    dims = [int(wide) if wide and types and types[i] == "full_attention" else base_dim for i in range(count)]
    sources = _kv_sources(text)
    return [
        LayerPlan(i, kinds[i], sources[i], dims[i] if kinds[i] is LayerKind.ATTENTION else None) for i in range(count)
    ]


def _kv_sources(text: Any) -> list[int | None]:
    """Per layer of a text config, the layer whose keys and values it reads (KV sharing, Gemma 3n / 4: each of the
    last ``num_kv_shared_layers`` layers reads the last earlier layer of its type), else None."""
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
    """The text decoder (the module with ``layers``) of a plain or PEFT-wrapped (M)LLM; nested decoders (Llama 4's
    ``get_decoder()`` is a causal LM whose ``model`` holds the layers) are followed down."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    for _ in range(3):  # a causal LM inside the MLLM: its own decoder, one level down
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
    from torch import nn  # lazy: a loaded model has torch; the config view (geometry, before loading) needs none

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
            source = _kv_sources(attention.config)[index]  # transformers >= 5.8 keeps no index: keyed by layer type
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
    """Every text-decoder layer of a loaded model, in order, with its kind and attention projections."""
    return [_loaded_layer(index, layer) for index, layer in enumerate(text_decoder(model).layers)]


def head_projections(model: nn.Module) -> dict[int, nn.Module]:
    """Decoder layer index -> its attention's output projection (``o_proj``; the LoRA layer itself when LoRA
    targets it), for the layers with heads; refused when no layer has any."""
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
    """For each decoder layer, whether a trainable parameter feeds its ``o_proj`` input: everything outside the
    decoder layers (embeddings, vision tower, projector; not the final norm or an untied ``lm_head``), the layers
    before it, and its own input norm and attention projections other than ``o_proj``."""
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
    """(RAH-LoRA's calibratable layers, whose heads own their value and output projections, the others -> why not). A
    KV-shared layer reads another layer's values, so a V update of its own ``v_proj`` would be silently void; a
    loaded layer also needs ``v_proj`` and the output projection as plain ``nn.Linear``; with ``head_dim``, a layer
    whose heads have another width (Gemma 4's full-attention layers) is left out (RAH-LoRA assumes one head width)."""
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
    """Source layer -> the layers that read its keys and values (Gemma 3n / Gemma 4's KV sharing; empty when none). A
    reader gets them through transformers' ``shared_kv_states`` dict, not as an input of its checkpointed call, so
    only non-reentrant checkpointing (or none) in the whole chain carries their gradient back
    (:mod:`llamafactory_hera.training.layer_checkpointing`)."""
    chains: dict[int, list[int]] = {}
    for plan in plans:
        if plan.kv_source is not None:
            chains.setdefault(plan.kv_source, []).append(plan.index)
    return chains


def head_layers(plans: list[LayerPlan]) -> list[int]:
    """The indices of the layers with heads."""
    return [plan.index for plan in plans if plan.has_heads]


def describe(plans: list[LayerPlan]) -> str:
    """Runs of layers by kind, e.g. ``L0-L2 linear attention, L3 softmax attention, ...`` (KV sharing named)."""
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
