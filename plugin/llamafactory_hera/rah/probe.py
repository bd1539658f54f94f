"""What RAH-LoRA measures: attention (I-SAL, text->image maps) and head-gate gradients (CAF), under eager attention.

Shapes: I-SAL ``[B, L, H]`` over the scored layers, maps ``[L, H, P]`` over a sample's P image positions, gate
gradients ``[L, H]`` per sample. The attention sink, each row's first attended position, is not a text position.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from llamafactory_hera.heads.architecture import DecoderLayer
from llamafactory_hera.heads.pooling import multimodal_token_ids
from llamafactory_hera.rah.plan import plan_calibration
from llamafactory_hera.rah.scores import isal, margin_loss
from llamafactory_hera.runtime.errors import RecipeError


def attention_modules(model: nn.Module) -> dict[int, DecoderLayer]:
    """Layer index -> layer, for the calibratable layers (:mod:`llamafactory_hera.rah.plan`)."""
    return plan_calibration(model).modules


def _on(device: torch.device, masks: dict[torch.device, tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """The batch's token masks on ``device``, copied once (``masks``: by device, the input's first)."""
    if device not in masks:
        masks[device] = tuple(mask.to(device) for mask in next(iter(masks.values())))
    return masks[device]


@contextlib.contextmanager
def attention_weights(modules: dict[int, DecoderLayer], layers: list[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Layer -> attention weights ``[B, H, T, T]`` its self-attention returned in the last forward."""
    weights: dict[int, torch.Tensor] = {}

    def keep(layer: int):
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if isinstance(output, tuple) and len(output) > 1 and isinstance(output[1], torch.Tensor):
                weights[layer] = output[1]

        return hook

    with contextlib.ExitStack() as hooks:  # each hook removed on exit
        for layer in layers:
            hooks.enter_context(modules[layer].module.self_attn.register_forward_hook(keep(layer)))
        yield weights


@dataclass(frozen=True)
class TokenKinds:
    """Ids deciding a position's kind: image placeholders (I) and other multimodal tokens (vision start / end, video:
    neither I nor T)."""

    image_ids: frozenset[int]
    other_multimodal_ids: frozenset[int] = frozenset()


def token_kinds(model: nn.Module, tokenizer: Any, processor: Any = None) -> TokenKinds:
    """The config's image placeholder id and other multimodal tokens."""
    config = model.config
    image = {
        int(v)
        for v in (getattr(config, "image_token_id", None), getattr(config, "image_token_index", None))
        if isinstance(v, int)
    }
    if not image:
        raise RecipeError(
            f"RAH-LoRA: the config of model_type '{getattr(config, 'model_type', '?')}' names no image "
            "token (image_token_id / image_token_index), so image positions cannot be found. Use a "
            "multimodal model such as llava-hf/llava-1.5-7b-hf."
        )
    others = multimodal_token_ids(config, processor, tokenizer) - image
    return TokenKinds(frozenset(image), frozenset(others))


def token_masks(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, kinds: TokenKinds
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image positions I, text positions T, text after the first image token), ``[B, T]`` bool each; T leaves out
    the sink (or the first system token), wherever the padding is."""
    attended = attention_mask.bool()
    sink = attended & (attended.long().cumsum(dim=1) == 1)

    def isin(ids: frozenset[int]) -> torch.Tensor:
        return torch.isin(input_ids, torch.tensor(sorted(ids), dtype=input_ids.dtype, device=input_ids.device))

    image = isin(kinds.image_ids) & attended
    text = attended & ~image & ~sink
    if kinds.other_multimodal_ids:
        text &= ~isin(kinds.other_multimodal_ids)
    seen_image = image.long().cumsum(dim=1) > 0
    return image, text, text & seen_image


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in batch.items() if k != "labels"}


def image_layouts(batch: dict[str, Any], image: torch.Tensor) -> list[tuple[int, ...]]:
    """``image`` ``[B, T]`` bool -> B keys: rows with one key share their image grid."""
    counts = [int(n) for n in image.sum(dim=1)]
    grids = batch.get("image_grid_thw")
    if grids is None or not counts or sum(counts) == 0:
        return [(n,) for n in counts]
    cells = [int(c) for c in grids.prod(dim=-1)]  # patches per image; tokens = patches / merge^2
    per_token = sum(cells) / sum(counts)
    keys = []
    next_image = 0
    for n in counts:
        row: list[int] = [n]
        taken = 0
        while taken < n and next_image < len(cells):
            row.extend(int(v) for v in grids[next_image])
            taken += round(cells[next_image] / per_token)
            next_image += 1
        keys.append(tuple(row))
    return keys


@dataclass
class AttentionProfile:
    """Per-sample I-SAL and text->image maps over batches; maps summed per image layout (:func:`image_layouts`)."""

    layers: list[int]
    isal: list[torch.Tensor] = field(default_factory=list)  # [B, L, H] per batch
    one_sided: int = 0  # samples scored on one half (no text before the image)
    map_sums: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict)  # layout -> [L, H, P_layout]
    map_rows: dict[tuple[int, ...], int] = field(default_factory=dict)  # layout -> rows summed
    map_skipped: int = 0  # samples without a map: no text query after their image

    def scores(self) -> torch.Tensor:
        """``[N, L, H]``"""
        return torch.cat(self.isal)

    def maps(self) -> torch.Tensor:
        """``[L, H, P']`` whose cosine between two heads is Eq. 10's s_func over all rows with a map: within a layout
        the cosine of the heads' mean maps; across layouts (no common grid) the row-weighted mean of those cosines,
        by concatenating ``sqrt(w) * mean map / |mean map|``. One layout (LLaVA-1.5: 576 image tokens): Eq. 10."""
        if not self.map_sums:
            raise RecipeError("RAH-LoRA: no sample had text after its image, so no text->image attention map exists.")
        total = sum(self.map_rows.values())
        parts = []
        for layout, summed in self.map_sums.items():
            mean = summed / self.map_rows[layout]
            unit = mean / mean.norm(dim=-1, keepdim=True).clamp(min=torch.finfo(mean.dtype).tiny)
            parts.append(unit * (self.map_rows[layout] / total) ** 0.5)
        return torch.cat(parts, dim=-1)


@torch.no_grad()
def profile_attention(
    model: nn.Module,
    batch: dict[str, Any],
    layers: list[int],
    kinds: TokenKinds,
    profile: AttentionProfile,
    pairs: str = "paper",
    modules: dict[int, DecoderLayer] | None = None,
) -> None:
    """One eager forward adding the batch's I-SAL and text->image maps to ``profile``. A row's map: mean attention to
    each image position over its text queries (``pairs``: ``paper`` all text, Eq. 3 and 10; ``visible`` text after the
    image)."""
    with attention_weights(modules or attention_modules(model), layers) as attentions:
        model(**model_inputs(batch), output_attentions=True, use_cache=False)
    if any(attentions.get(layer) is None for layer in layers):
        raise RecipeError(
            "RAH-LoRA needs attention weights: the model did not return them (load it with eager "
            "attention, flash_attn: disabled)."
        )
    image, text, after = token_masks(batch["input_ids"], batch["attention_mask"], kinds)
    masks = {image.device: (image, text, after)}
    per_layer = [isal(attentions[layer], *_on(attentions[layer].device, masks)[:2], pairs) for layer in layers]
    first = per_layer[0][0].device
    profile.isal.append(torch.stack([scores.to(first) for scores, _ in per_layer], dim=1).cpu())
    profile.one_sided += int((~per_layer[0][1]).sum())
    queries = 1 if pairs == "paper" else 2  # text, or the text after the image
    for b, layout in enumerate(image_layouts(batch, image)):
        if not bool(after[b].any()):
            profile.map_skipped += 1
            continue
        rows = torch.stack(
            [
                attentions[layer][b][:, on[queries][b]][:, :, on[0][b]].float().mean(dim=1).to(first)
                for layer in layers
                for on in [_on(attentions[layer].device, masks)]
            ]
        ).cpu()  # [L, H, P]
        profile.map_sums[layout] = profile.map_sums[layout] + rows if layout in profile.map_sums else rows
        profile.map_rows[layout] = profile.map_rows.get(layout, 0) + 1


@contextlib.contextmanager
def head_gates(
    modules: dict[int, DecoderLayer], layers: list[int], num_heads: int, head_dim: int
) -> Iterator[dict[int, torch.Tensor]]:
    """Gates gamma ``[H]`` = 1 (requiring grad) multiplying each layer's ``o_proj`` input viewed as
    ``[B, T, H, d_head]`` (Eq. 5): layer -> gate."""
    gates: dict[int, torch.Tensor] = {}

    def pre_hook(module: nn.Module, args: tuple[Any, ...], layer: int) -> tuple[Any, ...]:
        x = args[0]
        if layer not in gates:
            gates[layer] = torch.ones(
                num_heads, device=x.device, requires_grad=True, dtype=torch.promote_types(x.dtype, torch.float32)
            )
        shaped = x.view(*x.shape[:-1], num_heads, head_dim) * gates[layer].to(x.dtype)[:, None]
        return (shaped.view(x.shape), *args[1:])

    with contextlib.ExitStack() as hooks:
        for layer in layers:
            hook = functools.partial(pre_hook, layer=layer)
            hooks.enter_context(modules[layer].output.register_forward_pre_hook(hook))
        yield gates


def gate_gradients(
    model: nn.Module,
    batch: dict[str, Any],
    layers: list[int],
    num_heads: int,
    head_dim: int,
    kinds: TokenKinds,
    modules: dict[int, DecoderLayer] | None = None,
) -> torch.Tensor:
    """d(margin loss)/d(gate) of one sample at gamma = 1: ``[L, H]`` float32 on the CPU."""
    offloaded = any(at in ("cpu", "disk") for at in (getattr(model, "hf_device_map", None) or {}).values())
    kept = torch.autograd.graph.save_on_cpu() if offloaded else contextlib.nullcontext()
    with (
        head_gates(modules or attention_modules(model), layers, num_heads, head_dim) as gates,
        torch.enable_grad(),
        kept,
    ):
        logits = model(**model_inputs(batch), use_cache=False).logits
        _, _, after = token_masks(batch["input_ids"], batch["attention_mask"], kinds)
        loss = margin_loss(logits, after.to(logits.device))
        grads = torch.autograd.grad(loss, [gates[layer] for layer in layers])
    return torch.stack([g.float().cpu() for g in grads])
