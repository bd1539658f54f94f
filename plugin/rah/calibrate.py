"""RAH-LoRA end to end on a loaded model: score heads, pick targets and anchors, calibrate each target in place.

Each target's V rows (its KV group) and O columns move towards the trimmed mean of its anchors' by a rank-r step
scaled by the largest alpha whose mean KL on the probe batch stays within delta (Eq. 6-15), relative to the model
as calibrated so far. Rolled-back heads are restored bit for bit. Shapes: V slice ``[d, D]``, O slice ``[D, d]``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import nn

from llamafactory_hera.rah.args import RahArguments
from llamafactory_hera.rah.heads import anchor_candidates, similarity, targets_in_layer, top_anchors
from llamafactory_hera.rah.probe import (
    AttentionProfile,
    TokenKinds,
    attention_modules,
    gate_gradients,
    profile_attention,
    token_masks,
)
from llamafactory_hera.rah.scores import caf_scores, standardize_per_layer
from llamafactory_hera.rah.update import TrustRegion, lora_pair, low_rank, search_alpha, trimmed_mean

_PAPER = RahArguments()  # the one source of the defaults


@dataclass(frozen=True)
class RahSettings:
    """The method's settings: ``RahArguments`` without the ``rah_`` prefix (same defaults; see there for each key),
    with the layers resolved and ``w_o = 1 - w_v``."""

    layers: tuple[int, ...]
    isal_percentile: float = _PAPER.rah_isal_percentile
    caf_percentile: float = _PAPER.rah_caf_percentile
    num_anchors: int = _PAPER.rah_num_anchors
    rank: int = _PAPER.rah_rank
    delta: float = _PAPER.rah_delta
    alpha_max: float = _PAPER.rah_alpha_max
    halvings: int = _PAPER.rah_halvings
    rho: float = _PAPER.rah_rho
    w_v: float = _PAPER.rah_w_v
    w_o: float = 1.0 - _PAPER.rah_w_v
    trim: float = _PAPER.rah_trim
    beta: float = _PAPER.rah_beta
    caf_form: str = _PAPER.rah_caf_form
    caf_weight: float = _PAPER.rah_caf_weight
    isal_pairs: str = _PAPER.rah_isal_pairs  # paper, visible (scores.isal)
    update: str = _PAPER.rah_update  # vo, o, v; auto: vo under MHA, o under GQA

    @classmethod
    def from_arguments(cls, args: RahArguments, layers: list[int]) -> RahSettings:
        """A recipe's ``rah_*`` values, on the resolved ``layers``."""
        named = {f.name for f in fields(cls)} - {"layers", "w_o"}
        values = {name: getattr(args, f"rah_{name}") for name in named}
        return cls(layers=tuple(layers), w_o=1.0 - args.rah_w_v, **values)


@dataclass
class HeadUpdate:
    """One target head: its anchors, the trust region's outcome and the rank-r factors per module (alpha apart)."""

    layer: int
    head: int
    anchors: list[tuple[int, float]]
    region: TrustRegion | None = None  # None: no anchor, nothing tried
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # U, S, Vh


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
    kl_to_original: float | None = None


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
    from llamafactory_hera.anatomy.heads import attention_geometry

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
    v = torch.stack([module.v_proj.weight[v_rows(h, geometry)].float() for h in heads])
    o = torch.stack([module.o_proj.weight[:, o_columns(h, geometry)].float() for h in heads])
    return v, o


def _probe_logits(model: nn.Module, batches: list[dict[str, Any]],
                  masks: list[tuple[torch.Tensor, ...]]) -> list[torch.Tensor]:
    """Logits at the probe's text positions after the image, float32: ``[n_positions, V]`` per batch. ``masks``
    holds those positions as index tensors (``mask.nonzero(as_tuple=True)``, found once): indexing with them needs
    no host sync, where a boolean mask would wait for the device at every alpha tried."""
    with torch.no_grad():
        return [model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits[mask].float()
                for batch, mask in zip(batches, masks, strict=True)]


def _kl(reference: list[torch.Tensor], current: list[torch.Tensor]) -> float:
    """Mean KL(reference || current) over every probe position."""
    sums, count = [], 0
    for ref, cur in zip(reference, current, strict=True):
        log_p, log_q = torch.log_softmax(ref, dim=-1), torch.log_softmax(cur, dim=-1)
        sums.append((log_p.exp() * (log_p - log_q)).sum())
        count += ref.shape[0]
    return sum(torch.stack(sums).tolist()) / max(count, 1) if sums else 0.0  # one host sync, not one per batch


def modules_for(settings: RahSettings, geometry: Geometry) -> tuple[str, ...]:
    """Which projections are updated: ``auto`` is V and O under MHA, O only under GQA (a V row block there serves
    several query heads)."""
    if settings.update == "auto":
        return ("v", "o") if geometry.num_kv_heads == geometry.num_heads else ("o",)
    return tuple(name for name in ("v", "o") if name in settings.update)


def calibrate(model: nn.Module, calibration_batches: list[dict[str, Any]], caf_batches: list[dict[str, Any]],
              kl_batches: list[dict[str, Any]], settings: RahSettings, kinds: TokenKinds,
              progress: Callable[[Iterable[Any], str], Iterable[Any]] = lambda items, _: items) -> Calibration:
    """Score, select and calibrate in place; ``caf_batches`` hold one sample each. Returns the record of it all."""
    layers = list(settings.layers)
    geometry = geometry_of(model)
    modules = attention_modules(model)
    profile = AttentionProfile(layers)
    for batch in progress(calibration_batches, "I-SAL (attention)"):
        profile_attention(model, batch, layers, kinds, profile, settings.isal_pairs)
    raw_isal = profile.scores().mean(dim=0)  # [L, H]
    isal_std = standardize_per_layer(raw_isal)
    grads = torch.stack([gate_gradients(model, batch, layers, geometry.num_heads, geometry.head_dim, kinds)
                         for batch in progress(caf_batches, "CAF (gate gradients)")])
    caf = caf_scores(grads, settings.caf_form, settings.caf_weight)
    maps = profile.maps()
    updates: list[HeadUpdate] = []
    for row, layer in enumerate(layers):
        chosen = targets_in_layer(isal_std[row], caf[row], settings.isal_percentile, settings.caf_percentile)
        candidates = anchor_candidates(isal_std[row], settings.beta, exclude=chosen)
        all_heads = list(range(geometry.num_heads))
        v_all, o_all = _slices(modules[layer], all_heads, geometry)
        layer_maps = maps[row].to(v_all.device)  # the maps are kept on the host, the weight slices on the model's
        for head in chosen:
            scores = similarity(head, candidates, layer_maps, v_all, o_all, settings.rho, settings.w_v, settings.w_o) \
                if candidates else torch.empty(0)
            updates.append(HeadUpdate(layer, head, top_anchors(scores, candidates, settings.num_anchors)))
    names = modules_for(settings, geometry)
    masks = [token_masks(b["input_ids"], b["attention_mask"], kinds)[2].nonzero(as_tuple=True) for b in kl_batches]
    original = _probe_logits(model, kl_batches, masks)
    reference = original
    for update in progress(updates, "calibrating targets (trust region)"):
        if update.anchors:
            reference = _calibrate_head(model, modules[update.layer], update, geometry, names, settings, kl_batches,
                                        masks, reference)
    kl_to_original = _kl(original, _probe_logits(model, kl_batches, masks)) if updates else 0.0
    return Calibration(layers, raw_isal, isal_std, caf, updates, names, profile.one_sided, profile.map_skipped,
                       kl_to_original)


def _calibrate_head(model: nn.Module, module: nn.Module, update: HeadUpdate, geometry: Geometry,
                    names: tuple[str, ...], settings: RahSettings, batches: list[dict[str, Any]],
                    masks: list[tuple[torch.Tensor, ...]], reference: list[torch.Tensor]) -> list[torch.Tensor]:
    """Calibrate one target in place; returns the probe logits of the model as it now is."""
    anchors = [head for head, _ in update.anchors]
    v_anchor, o_anchor = _slices(module, anchors, geometry)
    v_head, o_head = _slices(module, [update.head], geometry)
    targets = {"v": (module.v_proj.weight, (v_rows(update.head, geometry), slice(None)), v_head[0], v_anchor),
               "o": (module.o_proj.weight, (slice(None), o_columns(update.head, geometry)), o_head[0], o_anchor)}
    saved, steps = {}, {}
    for name in names:
        weight, index, own, anchor = targets[name]
        u, s, vh = low_rank(trimmed_mean(anchor, settings.trim) - own, settings.rank)
        update.factors[name] = (u, s, vh)
        saved[name] = weight.data[index].clone()
        steps[name] = (u, s, vh)
    last: dict[float, list[torch.Tensor]] = {}

    def set_alpha(alpha: float) -> None:
        # The model as LLaMA-Factory loads the adapter: PEFT merges it as ``weight += B @ A`` (B, A in float32),
        # rounded once to the model's dtype. So the step is the adapter's own product, added in float32 to the
        # weights and rounded to their dtype: base + merged adapter equals the model this trust region accepts
        # (in bf16 too, where the rounded step differs from the exact one; see the README's RAH-LoRA section).
        for name in names:
            weight, index, _, _ = targets[name]
            b, a = lora_pair(*steps[name], alpha)
            weight.data[index] = (saved[name].float() + b @ a).to(weight.dtype)

    def kl_at(alpha: float) -> float:
        set_alpha(alpha)
        last[alpha] = _probe_logits(model, batches, masks)
        return _kl(reference, last[alpha])

    region = search_alpha(kl_at, settings.alpha_max, settings.delta, settings.halvings)
    if not region.rolled_back:
        set_alpha(region.alpha)
        if all(torch.equal(targets[n][0].data[targets[n][1]], saved[n]) for n in names):  # one sync per head
            region = replace(region, rounds_to_zero=True)  # nothing moved in the model's dtype: not calibrated
    update.region = region
    if region.rolled_back:
        for name in names:
            weight, index, _, _ = targets[name]
            weight.data[index] = saved[name]
        return reference
    return last[region.alpha]
