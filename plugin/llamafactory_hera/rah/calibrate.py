"""RAH-LoRA end to end on a loaded model: score heads, pick targets and anchors, calibrate each target in place.

Each target's V rows (its KV group) and O columns move towards the trimmed mean of its anchors' by a rank-r step
scaled by the largest alpha whose mean KL on the probe batch stays within delta (Eq. 6-15), relative to the model
as calibrated so far. Rolled-back heads are restored bit for bit. Shapes: V slice ``[d, D]``, O slice ``[D, d]``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from llamafactory_hera.heads.geometry import attention_geometry
from llamafactory_hera.rah.config import AUTO, RahArguments
from llamafactory_hera.rah.probe import (
    AttentionProfile,
    TokenKinds,
    attention_modules,
    gate_gradients,
    left_out_layers,
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
from llamafactory_hera_patches.errors import RecipeError


@dataclass
class HeadUpdate:
    """One target head: its anchors, the trust region's outcome and the rank-r factors per module (alpha apart)."""

    layer: int
    head: int
    anchors: list[tuple[int, int, float]]  # (layer, head, similarity), most similar first
    anchor_distance: int | None = None  # layers between the target and its anchors (0: same layer); None: no anchor
    region: TrustRegion | None = None  # None: no anchor, nothing tried
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # U, S, Vh
    unchanged: bool = False  # the kept step rounds to no change of any weight in the model's dtype

    @property
    def calibrated(self) -> bool:
        """A step was kept and it changed the model's weights."""
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
    """Everything the run reports: scores ``[L, H]`` over ``layers``, the targets in order, KL to the original."""

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


@dataclass(frozen=True)
class Geometry:
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads


def geometry_of(model: nn.Module) -> Geometry:
    """Query heads, KV heads and head width of the text decoder (from the config)."""
    geometry = attention_geometry(model.config)
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    kv = int(getattr(text, "num_key_value_heads", None) or geometry.num_heads)
    return Geometry(geometry.num_heads, kv, geometry.head_dim)


def v_rows(head: int, geometry: Geometry) -> slice:
    """Rows of ``v_proj.weight`` that produce ``head``'s values (its KV group's ``d`` rows)."""
    group = head // geometry.group
    return slice(group * geometry.head_dim, (group + 1) * geometry.head_dim)


def o_columns(head: int, geometry: Geometry) -> slice:
    """Columns of ``o_proj.weight`` that read ``head``'s output."""
    return slice(head * geometry.head_dim, (head + 1) * geometry.head_dim)


def _slices(module: nn.Module, heads: Iterable[int], geometry: Geometry) -> tuple[torch.Tensor, torch.Tensor]:
    """(V slices ``[n, d, D]``, O slices ``[n, D, d]``) of ``heads``, float32."""
    v = torch.stack([module.value.weight[v_rows(h, geometry)].float() for h in heads])
    o = torch.stack([module.output.weight[:, o_columns(h, geometry)].float() for h in heads])
    return v, o


def _probe_logits(model: nn.Module, batches: list[dict[str, Any]],
                  positions: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Logits at the probe's text positions after the image, float32: ``[n_positions, V]`` per sample.
    ``positions`` holds each sample's positions as an index tensor (found once, in :func:`calibrate`): indexing
    with it needs no host sync, where a boolean mask would wait for the device at every alpha tried."""
    with torch.no_grad():
        logits = [model(**model_inputs(batch), use_cache=False).logits for batch in batches]
    return [rows[b][index].float() for rows, sample in zip(logits, positions, strict=True)
            for b, index in enumerate(sample)]


def modules_for(args: RahArguments, geometry: Geometry) -> tuple[str, ...]:
    """Which projections are updated: ``auto`` is V and O under MHA, O only under GQA (a V row block there serves
    several query heads)."""
    if args.rah_update == "auto":
        return ("v", "o") if geometry.num_kv_heads == geometry.num_heads else ("o",)
    return tuple(name for name in ("v", "o") if name in args.rah_update)


def _joined(tables: list[torch.Tensor]) -> torch.Tensor:
    """Per-head tables of several layers, one after the other along dim 0 (no copy for one)."""
    return tables[0] if len(tables) == 1 else torch.cat(tables)


def layers_to_calibrate(model: nn.Module, args: RahArguments) -> tuple[list[int], dict[int, str]]:
    """(the layers ``rah_layers`` asks for that can be calibrated, the layers left out, each with why it cannot be
    calibrated: under ``auto``, which takes the first half of the calibratable layers, every such layer of the
    model; else those ``rah_layers`` names)."""
    modules, left = attention_modules(model), left_out_layers(model)
    asked = args.layer_list(len(modules) + len(left), list(modules))
    if args.rah_layers == AUTO:
        return asked, left
    return [layer for layer in asked if layer in modules], {layer: left[layer] for layer in asked if layer in left}


def calibrate(model: nn.Module, calibration_batches: list[dict[str, Any]], caf_batches: list[dict[str, Any]],
              kl_batches: list[dict[str, Any]], args: RahArguments, kinds: TokenKinds,
              progress: Callable[[Iterable[Any], str], Iterable[Any]] = lambda items, _: items) -> Calibration:
    """Score, select and calibrate in place the layers ``args.rah_layers`` names; ``caf_batches`` hold one sample
    each. Returns the record of it all."""
    geometry = geometry_of(model)
    modules = attention_modules(model)
    layers, _ = layers_to_calibrate(model, args)
    profile = AttentionProfile(layers)
    for batch in progress(calibration_batches, "I-SAL (attention)"):
        profile_attention(model, batch, layers, kinds, profile, args.rah_isal_pairs)
    raw_isal = profile.scores().mean(dim=0)  # [L, H]
    isal_std = standardize_per_layer(raw_isal)
    grads = torch.stack([gate_gradients(model, batch, layers, geometry.num_heads, geometry.head_dim, kinds)
                         for batch in progress(caf_batches, "CAF (gate gradients)")])
    caf = caf_scores(grads, args.rah_caf_form, args.rah_caf_weight)
    names = modules_for(args, geometry)
    device = modules[layers[0]].output.weight.device
    maps = profile.maps().to(device)  # [L, H, P'] next to the weight slices it is added to
    chosen = {layer: targets_in_layer(isal_std[row], caf[row], args.rah_isal_percentile, args.rah_caf_percentile)
              for row, layer in enumerate(layers)}
    candidates = {layer: anchor_candidates(isal_std[row], args.rah_beta, exclude=chosen[layer])
                  for row, layer in enumerate(layers)}
    rows = {layer: row for row, layer in enumerate(layers)}

    @lru_cache(maxsize=3)  # the target's layer and, for the fallback, the two at one distance
    def slices(layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _slices(modules[layer], range(geometry.num_heads), geometry)

    updates: list[HeadUpdate] = []
    for layer in layers:
        for head in chosen[layer]:
            distance, pool = anchor_pool(layer, head, candidates, geometry.group, "v" not in names,
                                         args.rah_adjacent_layers)
            if not pool:
                updates.append(HeadUpdate(layer, head, []))
                continue
            blocks = [layer] + sorted({other for other, _ in pool} - {layer})  # tables: own layer's heads first
            index = {(other, h): i * geometry.num_heads + h for i, other in enumerate(blocks)
                     for h in range(geometry.num_heads)}
            v_all, o_all = (_joined([slices(other)[i] for other in blocks]) for i in (0, 1))
            shared = {index[(layer, h)] for other, h in pool if other == layer and h // geometry.group ==
                      head // geometry.group}
            flat = [index[entry] for entry in pool]
            scores = similarity(index[(layer, head)], flat, _joined([maps[rows[other]] for other in blocks]), v_all,
                                o_all, args.rah_rho, args.rah_w_v, 1.0 - args.rah_w_v, shared_v=shared)
            best = top_anchors(scores, flat, args.rah_num_anchors)
            entry_of = dict(zip(flat, pool, strict=True))
            updates.append(HeadUpdate(layer, head, [(*entry_of[i], score) for i, score in best], distance))
    slices.cache_clear()
    # per KL probe batch and sample, the text positions after the image (one host sync per sample, once)
    masks = [[row.nonzero(as_tuple=True)[0] for row in token_masks(b["input_ids"], b["attention_mask"], kinds)[2]]
             for b in kl_batches]
    if not any(index.numel() for sample in masks for index in sample):
        raise RecipeError("RAH-LoRA: no KL probe row has text after its image, so no update could be measured; use "
                          "rows whose text follows the image.")
    original = _probe_logits(model, kl_batches, masks)
    reference = original
    for update in progress(updates, "calibrating targets (trust region)"):
        if update.anchors:
            reference = _calibrate_head(model, modules, update, geometry, names, args, kl_batches, masks,
                                        reference)
    kl_to_original = mean_kl(original, _probe_logits(model, kl_batches, masks)) if updates else 0.0
    dtype = str(modules[layers[0]].output.weight.dtype).removeprefix("torch.")
    return Calibration(layers, raw_isal, isal_std, caf, updates, names, profile.one_sided, profile.map_skipped,
                       len(profile.map_sums), kl_to_original, dtype)


def _calibrate_head(model: nn.Module, modules: list[nn.Module], update: HeadUpdate, geometry: Geometry,
                    names: tuple[str, ...], args: RahArguments, batches: list[dict[str, Any]],
                    masks: list[list[torch.Tensor]], reference: list[torch.Tensor]) -> list[torch.Tensor]:
    """Calibrate one target in place; returns the probe logits of the model as it now is. Anchors may sit in
    another layer (the adjacent-layer fallback): their slices are read from their own layer."""
    module = modules[update.layer]
    anchor_slices = [_slices(modules[layer], [head], geometry) for layer, head, _ in update.anchors]
    v_anchor, o_anchor = (torch.cat([pair[i] for pair in anchor_slices]) for i in (0, 1))
    v_head, o_head = _slices(module, [update.head], geometry)
    targets = {"v": (module.value.weight, (v_rows(update.head, geometry), slice(None)), v_head[0], v_anchor),
               "o": (module.output.weight, (slice(None), o_columns(update.head, geometry)), o_head[0], o_anchor)}
    saved = {}
    for name in names:
        weight, index, own, anchor = targets[name]
        update.factors[name] = low_rank(trimmed_mean(anchor, args.rah_trim) - own, args.rah_rank)
        saved[name] = weight.data[index].clone()
    last: dict[float, list[torch.Tensor]] = {}

    def set_alpha(alpha: float) -> None:
        # The model as LLaMA-Factory loads the adapter: PEFT merges it as ``weight += B @ A`` (B, A in float32),
        # rounded once to the model's dtype. So the step is the adapter's own product, added in float32 to the
        # weights and rounded to their dtype: base + merged adapter equals the model this trust region accepts
        # (in bf16 too, where the rounded step differs from the exact one; see docs/rah.md, "What a run does").
        for name in names:
            weight, index, _, _ = targets[name]
            b, a = lora_pair(*update.factors[name], alpha)
            weight.data[index] = (saved[name].float() + b @ a).to(weight.dtype)

    def kl_at(alpha: float) -> float:
        set_alpha(alpha)
        last[alpha] = _probe_logits(model, batches, masks)
        return mean_kl(reference, last[alpha])

    region = search_alpha(kl_at, args.rah_alpha_max, args.rah_delta, args.rah_halvings)
    update.region = region
    if not region.rolled_back:
        set_alpha(region.alpha)
        update.unchanged = all(torch.equal(targets[name][0].data[targets[name][1]], saved[name]) for name in names)
    if region.rolled_back or update.unchanged:
        for name in names:
            weight, index, _, _ = targets[name]
            weight.data[index] = saved[name]
        return reference
    return last[region.alpha]
