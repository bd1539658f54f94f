"""The residual entering decoder layer ``l``, read by a forward pre-hook. Why that keeps the coupling's gradient under
every checkpointing: docs/harc.md ("What a step computes")."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from llamafactory_hera.heads.architecture import text_decoder
from llamafactory_hera.runtime.errors import RecipeError


@contextmanager
def reading_layers(model: nn.Module, layers: list[int], read: Callable[[int, torch.Tensor], None]) -> Iterator[None]:
    """Call ``read(layer, hidden [B, T, D])`` with the residual entering each of ``layers`` during forwards inside."""
    modules = text_decoder(model).layers  # of a plain, PEFT-wrapped or unwrapped DDP / DeepSpeed causal LM

    def hook_for(layer: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            read(layer, args[0] if args else kwargs["hidden_states"])

        return hook

    with ExitStack() as hooks:  # each hook removed on exit
        for layer in layers:
            # first: ZeRO-3's own pre-hook hands the layer a detached copy of its input (made without a graph inside
            # a reentrant layer's no_grad forward); the read takes the input as the checkpoint got it
            hooks.enter_context(
                modules[layer].register_forward_pre_hook(hook_for(layer), with_kwargs=True, prepend=True)
            )
        yield


def at_positions(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``hidden[b, positions[b]]`` for each row: ``[B, T, D]``, ``[B]`` -> ``[B, D]``."""
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), positions.to(hidden.device)]


def response_window(response_mask: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``[B, T]`` weights averaging each row's first ``num_tokens`` response tokens (all zero without a response);
    ``response_mask`` ``[B, T]`` holds one contiguous run per row."""
    mask = response_mask.bool()
    rank = torch.cumsum(mask.long(), dim=1)  # 1 at the first response token, 2 at the second, ...
    window = (mask & (rank <= num_tokens)).float()
    return window / window.sum(dim=1, keepdim=True).clamp_min(1.0)


class StepCapture:
    """One training forward's residuals at the selected layers. The hook only keeps each input ``[B, T, D]``: non-
    reentrant checkpointing needs the recompute to save exactly what the first forward saved. :meth:`read` gives
    ``inst[l]`` / ``post[l]`` / ``response[l]`` ``[B, D]``, in the autograd graph."""

    def __init__(
        self, t_inst: torch.Tensor, t_post: torch.Tensor, window: torch.Tensor | None, require_grad: bool
    ) -> None:
        self.t_inst = t_inst
        self.t_post = t_post
        self.window = window
        self.require_grad = require_grad
        self.hidden: dict[int, torch.Tensor] = {}
        self.inst: dict[int, torch.Tensor] = {}
        self.post: dict[int, torch.Tensor] = {}
        self.response: dict[int, torch.Tensor] = {}

    def __call__(self, layer: int, hidden: torch.Tensor) -> None:
        self.hidden.setdefault(layer, hidden)  # a recomputation during backward passes again: keep the first

    def read(self, layers: list[int]) -> None:
        for layer in layers:
            if layer not in self.hidden:
                raise RuntimeError(
                    f"HARC: decoder layer {layer} was not called in the forward; its residual could not be read."
                )
            hidden = self.hidden[layer]
            if self.require_grad and not hidden.requires_grad:
                raise RecipeError(
                    f"HARC: the residual entering decoder layer {layer} carries no gradient, so the "
                    "coupling loss would not train anything: no trainable parameter below that layer "
                    "(LoRA must target the decoder layers)."
                )
            self.inst[layer] = at_positions(hidden, self.t_inst)
            self.post[layer] = at_positions(hidden, self.t_post)
            if self.window is not None:
                weights = self.window.to(device=hidden.device, dtype=hidden.dtype)
                self.response[layer] = torch.einsum("bt,btd->bd", weights, hidden)
        self.hidden = {}
