"""Head references (``L<layer>H<head>`` as the paper, zero-based) and the text decoder's attention geometry."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from llamafactory_hera.heads.architecture import head_layers, layer_list, plan_layers
from llamafactory_hera.runtime.errors import RecipeError

_HEAD_RE = re.compile(r"^\s*L(\d+)\s*H(\d+)\s*$", re.IGNORECASE)


@dataclass(frozen=True, order=True)
class HeadRef:
    layer: int
    head: int

    def __str__(self) -> str:
        return f"L{self.layer}H{self.head}"


@dataclass(frozen=True)
class AttentionGeometry:
    """``o_proj`` maps ``[.., num_heads * head_dim]`` to ``[.., hidden_size]``."""

    num_layers: int
    num_heads: int
    head_dim: int
    hidden_size: int
    head_layers: tuple[int, ...] = ()
    kinds: tuple[str, ...] = ()
    layer_head_dims: tuple[int | None, ...] = ()  # per layer (None: no heads); empty: head_dim

    def head_dim_of(self, layer: int) -> int:
        return self.layer_head_dims[layer] or self.head_dim if self.layer_head_dims else self.head_dim

    @property
    def num_model_heads(self) -> int:
        return len(self.head_layers) * self.num_heads


def parse_head(text: str | HeadRef) -> HeadRef:
    """``"L13H12"`` (any case; a parsed head as it is); RecipeError otherwise."""
    if isinstance(text, HeadRef):
        return text
    match = _HEAD_RE.match(str(text))
    if match is None:
        raise RecipeError(f"'{text}' is not a head; write heads as L<layer>H<head>, zero-based, e.g. L13H12")
    return HeadRef(int(match.group(1)), int(match.group(2)))


def head_names(heads: list[HeadRef]) -> list[str]:
    return [str(ref) for ref in heads]


def attention_geometry(config: Any) -> AttentionGeometry:
    """``head_dim`` as set (Qwen3, Gemma), else ``hidden_size // num_attention_heads``."""
    text = config.get_text_config()
    num_heads = int(text.num_attention_heads)
    hidden = int(text.hidden_size)
    head_dim = getattr(text, "head_dim", None) or hidden // num_heads
    plans = plan_layers(config)
    return AttentionGeometry(
        int(text.num_hidden_layers),
        num_heads,
        int(head_dim),
        hidden,
        tuple(head_layers(plans)),
        tuple(str(plan.kind) for plan in plans),
        tuple(plan.head_dim for plan in plans),
    )


def check_heads_fit(heads: list[HeadRef], geometry: AttentionGeometry, model_name: str) -> None:
    for ref in heads:
        if not (0 <= ref.layer < geometry.num_layers and 0 <= ref.head < geometry.num_heads):
            raise RecipeError(
                f"hera_heads: {ref} is outside {model_name}, which has layers L0..L{geometry.num_layers - 1} "
                f"and heads H0..H{geometry.num_heads - 1} per layer (zero-based). Fix or remove {ref}."
            )
        if geometry.head_layers and ref.layer not in geometry.head_layers:
            raise RecipeError(
                f"hera_heads: {ref} is in layer L{ref.layer} of {model_name}, a {geometry.kinds[ref.layer]} layer "
                f"without heads; its heads are in layers {layer_list(list(geometry.head_layers))}. Choose heads there."
            )


def check_has_heads(geometry: AttentionGeometry, config: Any, stage: str) -> None:
    if geometry.head_layers:
        return
    kinds = sorted(set(geometry.kinds))
    raise RecipeError(
        f"{stage} cannot run on model_type '{getattr(config, 'model_type', '?')}': none of its "
        f"{geometry.num_layers} decoder layers has softmax self-attention with a per-head output "
        f"projection (its layers: {', '.join(kinds)}). Use stage: sft for this model."
    )
