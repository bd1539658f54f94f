"""RAH-LoRA end to end on a loaded model: score heads, pick targets and anchors, calibrate each target (Eq. 6-15).
V slice ``[d, D]``, O ``[D, d]``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from llamafactory_hera.heads.architecture import DecoderLayer
from llamafactory_hera.rah.config import RahArguments
from llamafactory_hera.rah.overlay import WeightOverlay, head_slices, merges, module_step, o_columns, v_rows
from llamafactory_hera.rah.plan import CalibrationPlan, Geometry, plan_calibration
from llamafactory_hera.rah.probe import (
    AttentionProfile,
    TokenKinds,
    gate_gradients,
    model_inputs,
    profile_attention,
    token_masks,
)
from llamafactory_hera.rah.scores import caf_scores, standardize_per_layer
from llamafactory_hera.rah.targets_anchors import (
    anchor_candidates,
    anchor_pool,
    similarity,
    targets_in_layer,
    top_anchors,
)
from llamafactory_hera.rah.update import TrustRegion, lora_pair, low_rank, mean_kl, search_alpha, trimmed_mean
from llamafactory_hera.runtime.errors import RecipeError


@dataclass
class HeadUpdate:
    """One target head: anchors, trust-region outcome, rank-r factors per module (alpha apart)."""

    layer: int
    head: int
    anchors: list[tuple[int, int, float]]  # (layer, head, similarity), most similar first
    anchor_distance: int | None = None  # layers from target to anchors (0: same layer); None: no anchor
    region: TrustRegion | None = None  # None: no anchor, nothing tried
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # U, S, Vh
    unchanged: bool = False  # the kept step rounds to no change in the model's dtype

    @property
    def calibrated(self) -> bool:
        """A kept step that changed the model's weights."""
        return self.region is not None and not self.region.rolled_back and not self.unchanged

    @property
    def outcome(self) -> str:
        if self.region is None:
            return "no anchor"
        if self.region.rolled_back:
            return "rolled back"
        return "unchanged" if self.unchanged else "calibrated"


@dataclass
class Calibration:
    """The run's report: scores ``[L, H]`` over ``layers``, the targets in order, KL to the original."""

    layers: list[int]
    isal: torch.Tensor
    isal_std: torch.Tensor
    caf: torch.Tensor
    updates: list[HeadUpdate]
    modules: tuple[str, ...]
    one_sided_samples: int
    maps_skipped: int
    map_layouts: int = 1  # image layouts (grids) among the rows with a map
    kl_to_original: float | None = None
    dtype: str = "float32"  # of the calibrated weights
    plan: CalibrationPlan | None = None
    overlay: WeightOverlay | None = None  # kept steps a quantized or offloaded projection computes with


def _probe_logits(
    model: nn.Module, batches: list[dict[str, Any]], positions: list[list[torch.Tensor]]
) -> list[torch.Tensor]:
    """Float32 logits ``[n_positions, V]`` per sample at the probe's text positions after the image (index tensors:
    a boolean mask would sync at every alpha)."""
    with torch.no_grad():
        logits = [model(**model_inputs(batch), use_cache=False).logits for batch in batches]
    return [
        rows[b][index.to(rows.device)].float()
        for rows, sample in zip(logits, positions, strict=True)
        for b, index in enumerate(sample)
    ]  # the logits on the last layer's device


def _joined(tables: list[torch.Tensor]) -> torch.Tensor:
    return tables[0] if len(tables) == 1 else torch.cat(tables)


def calibrate(
    model: nn.Module,
    calibration_batches: list[dict[str, Any]],
    caf_batches: list[dict[str, Any]],
    kl_batches: list[dict[str, Any]],
    args: RahArguments,
    kinds: TokenKinds,
    progress: Callable[[Iterable[Any], str], Iterable[Any]] = lambda items, _: items,
    plan: CalibrationPlan | None = None,
) -> Calibration:
    """Score, select and calibrate the layers of ``args.rah_layers`` (``plan``: the run's, else made here).
    ``caf_batches`` hold one sample each. Steps are tried in an overlay (overlay.py)."""
    plan = plan or plan_calibration(model, args)
    geometry = plan.geometry
    modules = plan.modules
    layers = plan.layers
    names = plan.names
    profile = AttentionProfile(layers)
    for batch in progress(calibration_batches, "I-SAL (attention)"):
        profile_attention(model, batch, layers, kinds, profile, args.rah_isal_pairs, modules)
    raw_isal = profile.scores().mean(dim=0)  # [L, H]
    isal_std = standardize_per_layer(raw_isal)
    grads = torch.stack(
        [
            gate_gradients(model, batch, layers, geometry.num_heads, geometry.head_dim, kinds, modules)
            for batch in progress(caf_batches, "CAF (gate gradients)")
        ]
    )
    caf = caf_scores(grads, args.rah_caf_form, args.rah_caf_weight)
    overlay = WeightOverlay(plan.dtype)
    maps = profile.maps()  # [L, H, P']
    maps_on: dict[torch.device, torch.Tensor] = {}  # per device holding a layer's weight slices
    chosen = {
        layer: targets_in_layer(isal_std[row], caf[row], args.rah_isal_percentile, args.rah_caf_percentile)
        for row, layer in enumerate(layers)
    }
    candidates = {
        layer: anchor_candidates(isal_std[row], args.rah_beta, exclude=chosen[layer])
        for row, layer in enumerate(layers)
    }
    rows = {layer: row for row, layer in enumerate(layers)}

    @lru_cache(maxsize=3)  # the target's layer and, for the fallback, the two adjacent
    def slices(layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return head_slices(overlay, modules[layer], range(geometry.num_heads), geometry)

    updates: list[HeadUpdate] = []
    for layer in layers:
        for head in chosen[layer]:
            distance, pool = anchor_pool(
                layer, head, candidates, geometry.group, "v" not in names, args.rah_adjacent_layers
            )
            if not pool:
                updates.append(HeadUpdate(layer, head, []))
                continue
            blocks = [layer] + sorted({other for other, _ in pool} - {layer})  # tables: own layer's heads first
            index = {
                (other, h): i * geometry.num_heads + h
                for i, other in enumerate(blocks)
                for h in range(geometry.num_heads)
            }
            device = slices(layer)[0].device
            v_all, o_all = (_joined([slices(other)[i].to(device) for other in blocks]) for i in (0, 1))
            on_device = maps_on.setdefault(device, maps.to(device))
            shared = {
                index[(layer, h)]
                for other, h in pool
                if other == layer and h // geometry.group == head // geometry.group
            }
            flat = [index[entry] for entry in pool]
            scores = similarity(
                index[(layer, head)],
                flat,
                _joined([on_device[rows[other]] for other in blocks]),
                v_all,
                o_all,
                args.rah_rho,
                args.rah_w_v,
                1.0 - args.rah_w_v,
                shared_v=shared,
            )
            best = top_anchors(scores, flat, args.rah_num_anchors)
            entry_of = dict(zip(flat, pool, strict=True))
            updates.append(HeadUpdate(layer, head, [(*entry_of[i], score) for i, score in best], distance))
    slices.cache_clear()
    # per KL probe batch and sample, the text positions after the image (one host sync per sample)
    masks = [
        [row.nonzero(as_tuple=True)[0] for row in token_masks(b["input_ids"], b["attention_mask"], kinds)[2]]
        for b in kl_batches
    ]
    if not any(index.numel() for sample in masks for index in sample):
        raise RecipeError(
            "RAH-LoRA: no KL probe row has text after its image, so no update could be measured; use "
            "rows whose text follows the image."
        )
    original = _probe_logits(model, kl_batches, masks)
    reference = original
    for update in progress(updates, "calibrating targets (trust region)"):
        if update.anchors:
            reference = _calibrate_head(
                model, overlay, modules, update, geometry, names, args, kl_batches, masks, reference
            )
    kl_to_original = mean_kl(original, _probe_logits(model, kl_batches, masks)) if updates else 0.0
    return Calibration(
        layers,
        raw_isal,
        isal_std,
        caf,
        updates,
        names,
        profile.one_sided,
        profile.map_skipped,
        len(profile.map_sums),
        kl_to_original,
        str(plan.dtype).removeprefix("torch."),
        plan,
        overlay,
    )


def _calibrate_head(
    model: nn.Module,
    overlay: WeightOverlay,
    modules: dict[int, DecoderLayer],
    update: HeadUpdate,
    geometry: Geometry,
    names: tuple[str, ...],
    args: RahArguments,
    batches: list[dict[str, Any]],
    masks: list[list[torch.Tensor]],
    reference: list[torch.Tensor],
) -> list[torch.Tensor]:
    """Calibrate one target in ``overlay``, then settle it; return the probe logits of the model now."""
    module = modules[update.layer]
    v_head, o_head = head_slices(overlay, module, [update.head], geometry)
    anchor_slices = [head_slices(overlay, modules[layer], [head], geometry) for layer, head, _ in update.anchors]
    v_anchor, o_anchor = (torch.cat([pair[i].to(v_head.device) for pair in anchor_slices]) for i in (0, 1))
    targets = {
        "v": (module.value, (v_rows(update.head, geometry), slice(None)), v_head[0], v_anchor),
        "o": (module.output, (slice(None), o_columns(update.head, geometry)), o_head[0], o_anchor),
    }
    saved = {}
    whole = {}
    stepped = {}
    for name in names:
        linear, index, own, anchor = targets[name]
        update.factors[name] = low_rank(trimmed_mean(anchor, args.rah_trim) - own, args.rah_rank)
        current = overlay.current(linear)
        saved[name] = current[index].clone()
        whole[name] = current.clone() if merges(linear) else None
    last: dict[float, list[torch.Tensor]] = {}

    def set_alpha(alpha: float) -> None:
        # as LLaMA-Factory loads the adapter: merged into a plain weight in float32, rounded once to its dtype
        # (docs/rah.md "What a run does"), beside a quantized or offloaded one
        for name in names:
            linear, index = targets[name][:2]
            b, a = lora_pair(*update.factors[name], alpha)
            stepped[name] = (saved[name].float() + b @ a).to(saved[name].dtype)
            if whole[name] is not None:
                whole[name][index] = stepped[name]
            overlay.set_trial(
                linear,
                whole[name] if whole[name] is not None else module_step(name, b, a, update.head, geometry, linear),
            )

    def kl_at(alpha: float) -> float:
        set_alpha(alpha)
        last[alpha] = _probe_logits(model, batches, masks)
        return mean_kl(reference, last[alpha])

    region = search_alpha(kl_at, args.rah_alpha_max, args.rah_delta, args.rah_halvings)
    update.region = region
    if not region.rolled_back:
        set_alpha(region.alpha)
        update.unchanged = all(torch.equal(stepped[name], saved[name]) for name in names)
    for name in names:
        overlay.settle(targets[name][0], keep=not region.rolled_back and not update.unchanged)
    return reference if region.rolled_back or update.unchanged else last[region.alpha]
