"""RAH-LoRA's trial steps of a head's V rows and O columns, kept out of the model's weights.

A forward hook makes a projection compute a step as LLaMA-Factory will apply the adapter: a plain weight with a merged
copy; a quantized or offloaded one (not merged into) adds ``(x A^T) B^T`` to its output.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from accelerate.utils import align_module_device, has_offloaded_params
from torch import nn

from llamafactory_hera.heads.architecture import DecoderLayer
from llamafactory_hera.hera.projection import base_weight_columns
from llamafactory_hera.rah.plan import Geometry

Step = tuple[torch.Tensor, torch.Tensor]  # (B [out, r], A [r, in]) float32: adds B @ A to the weight


def _plain(weight: torch.Tensor) -> bool:
    return weight.dtype.is_floating_point and getattr(weight, "quant_state", None) is None  # not bitsandbytes'


def merges(linear: nn.Module) -> bool:
    """A plain floating weight on its device: the adapter merges into it and it holds a step exactly."""
    return _plain(linear.weight) and not has_offloaded_params(linear)


def joined(steps: list[Step]) -> Step:
    return torch.cat([b for b, _ in steps], dim=1), torch.cat([a for _, a in steps])


class WeightOverlay:
    """Per module: kept steps of non-merging ones and the trial; ``dtype``: a quantized weight's, read."""

    def __init__(self, dtype: torch.dtype | None = None) -> None:
        self.dtype = dtype
        self.kept: dict[nn.Module, Step] = {}
        self.trial: dict[nn.Module, torch.Tensor | Step] = {}
        self._hooks: dict[nn.Module, Any] = {}

    def current(self, linear: nn.Module) -> torch.Tensor:
        """``linear``'s weight ``[out, in]`` with its kept steps merged, on its compute device (not to be written)."""
        with align_module_device(linear):
            weight = linear.weight.detach() if _plain(linear.weight) else base_weight_columns(linear).to(self.dtype)
        if linear not in self.kept:
            return weight
        return (weight.float() + torch.matmul(*self.kept[linear])).to(weight.dtype)  # W + B @ A

    def set_trial(self, linear: nn.Module, trial: torch.Tensor | Step) -> None:
        """Make ``linear`` compute with ``trial``: a whole weight (merging) or a step (B, A) on its device."""
        self.trial[linear] = trial
        if linear not in self._hooks:
            self._hooks[linear] = linear.register_forward_hook(self._forward)

    def settle(self, linear: nn.Module, keep: bool) -> None:
        """End ``linear``'s trial: ``keep`` writes a whole weight into it, or keeps a step here."""
        trial = self.trial.pop(linear, None)
        if keep and isinstance(trial, torch.Tensor):
            linear.weight.data.copy_(trial)
        elif keep and trial is not None:
            self.kept[linear] = joined([self.kept[linear], trial]) if linear in self.kept else trial
        if linear not in self.kept and linear in self._hooks:
            self._hooks.pop(linear).remove()

    def _forward(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        trial = self.trial.get(module)
        if isinstance(trial, torch.Tensor):
            return nn.functional.linear(x, trial, module.bias)
        b, a = joined([step for step in (self.kept.get(module), trial) if step is not None])  # a hooked one has one
        return output + nn.functional.linear(nn.functional.linear(x, a.to(x.dtype)), b.to(x.dtype))


def v_rows(head: int, geometry: Geometry) -> slice:
    """``v_proj.weight`` rows producing ``head``'s values (its KV group's ``d`` rows)."""
    group = head // geometry.group
    return slice(group * geometry.head_dim, (group + 1) * geometry.head_dim)


def o_columns(head: int, geometry: Geometry) -> slice:
    """``o_proj.weight`` columns reading ``head``'s output."""
    return slice(head * geometry.head_dim, (head + 1) * geometry.head_dim)


def module_step(name: str, b: torch.Tensor, a: torch.Tensor, head: int, geometry: Geometry, linear: nn.Module) -> Step:
    """Whole-projection (B ``[out, r]``, A ``[r, in]``) for a head's slice step ``b @ a``: ``v_proj`` ``[kv*d, D]``:
    A reads every input, B writes the KV-group rows; ``o_proj`` ``[D, H*d]``: A reads the head's d columns, B writes
    every row."""
    if name == "v":
        whole = b.new_zeros(linear.out_features, b.shape[1])
        whole[v_rows(head, geometry)] = b
        return whole, a
    whole = a.new_zeros(a.shape[0], linear.in_features)
    whole[:, o_columns(head, geometry)] = a
    return b, whole


def head_slices(
    overlay: WeightOverlay, module: DecoderLayer, heads: Iterable[int], geometry: Geometry
) -> tuple[torch.Tensor, torch.Tensor]:
    """(V ``[n, d, D]``, O ``[n, D, d]``) float32 slices of ``heads`` as the layer now computes, on its device."""
    value = overlay.current(module.value)
    output = overlay.current(module.output)
    v = torch.stack([value[v_rows(h, geometry)].float() for h in heads])
    o = torch.stack([output[:, o_columns(h, geometry)].float() for h in heads])
    return v, o
