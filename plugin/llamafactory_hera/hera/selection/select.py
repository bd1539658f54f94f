"""Head selection end to end: recipe -> calibration pairs -> per-head MKNN -> chosen heads + record. Bad input fails
before weights load (:func:`prepare`); every path scores in one dtype (:func:`scoring_dtype`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llamafactory_hera.heads.architecture import head_projections
from llamafactory_hera.heads.geometry import HeadRef, attention_geometry
from llamafactory_hera.hera.config import DTYPES, MODES, RECIPE_BACKED, STRATEGIES, dest
from llamafactory_hera.hera.selection import collect
from llamafactory_hera.hera.selection.recipe_write import SelectionResult, write_text_atomic
from llamafactory_hera.hera.selection.scores import HeadNeighbours, all_head_neighbours
from llamafactory_hera.hera.teacher import (
    check_teacher_source,
    load_image_processor,
    load_teacher,
    teacher_batch_size,
)
from llamafactory_hera.hera.teacher_cache import cache_root, feature_store, path_fingerprint
from llamafactory_hera.placement import check_model_structure, device_map_for
from llamafactory_hera.recipe.model_paths import check_model_paths
from llamafactory_hera.runtime.errors import RecipeError
from llamafactory_hera.runtime.log import show
from llamafactory_hera.runtime.raw_recipe import truthy
from llamafactory_hera.training.eval_forward import keep_4bit_layout
from llamafactory_hera_patches.guard import recorded_versions
from llamafactory_hera_patches.tools.model_data import (
    load_aligned_rows,
    load_model_for_scoring,
    multimodal_dataset_and_collator,
)


@dataclass
class SelectionOptions:
    """Settings of one selection run (paper defaults: 1000 samples, 5 heads, worst, text mode, k=10)."""

    num_samples: int = 1000
    num_heads: int = 5
    strategy: str = "worst"
    mode: str = "text"
    seed: int = 0
    batch_size: int = 16
    device: str | None = None
    k: int = 10
    teacher: str = "facebook/dinov2-large"
    teacher_feature: str = "cls"
    dataset: list[str] | None = None  # default: the recipe's datasets
    progress: bool = True
    clamp: float = 0.95  # PRH's outlier clamp quantile (0: off)
    dtype: str = "float32"  # the language model's scoring dtype (scoring_dtype)

    def validate(self) -> None:
        if self.strategy not in STRATEGIES:
            raise RecipeError(f"--strategy: got {self.strategy!r}; allowed values are {', '.join(STRATEGIES)}.")
        if self.mode not in MODES:
            raise RecipeError(f"--mode: got {self.mode!r}; allowed values are {', '.join(MODES)}.")
        if self.dtype not in DTYPES:
            raise RecipeError(f"--dtype: got {self.dtype!r}; allowed values are {', '.join(DTYPES)}.")
        bounds = (
            ("--heads", self.num_heads, 1),
            ("--k", self.k, 1),
            ("--batch-size", self.batch_size, 1),
            ("--samples", self.num_samples, 2),
        )
        for name, value, low in bounds:
            if value < low:
                raise RecipeError(f"{name}: got {value}; allowed range is >= {low}.")
        if not 0 <= self.clamp <= 1:
            raise RecipeError(f"--clamp: got {self.clamp}; allowed range is 0..1 (0 turns the clamp off).")
        if self.num_samples < self.k + 1:
            raise RecipeError(f"--samples: got {self.num_samples}; with k={self.k} at least {self.k + 1} are needed.")

    @classmethod
    def from_keys(cls, hera: Any, args: Any = None, **settings: Any) -> SelectionOptions:
        """Options from ``hera``'s keys, each overridden by its option in ``args`` when given."""
        value = {
            key: getattr(hera, key) if getattr(args, dest(flag), None) is None else getattr(args, dest(flag))
            for flag, _, key, _ in RECIPE_BACKED
        }
        if getattr(args, "dataset", None):
            settings["dataset"] = [d.strip() for d in args.dataset.split(",")]
        return cls(
            num_samples=value["hera_select_samples"],
            num_heads=value["hera_select_num_heads"],
            strategy=value["hera_select_strategy"],
            mode=value["hera_select_mode"],
            batch_size=value["hera_select_batch_size"],
            k=value["hera_k"],
            teacher=value["hera_teacher"],
            clamp=value["hera_select_clamp"],
            teacher_feature=hera.hera_teacher_feature,
            **settings,
        )

    def resolved_device(self) -> str:
        return self.device or ("cuda" if torch.cuda.is_available() else "cpu")


def scoring_dtype(precision: Any) -> str:
    """The scoring dtype from a recipe's precision keys; with none set, the model's saved floating dtype, which
    LLaMA-Factory then trains in (docs/hera.md "One dtype")."""
    if truthy(precision.get("bf16")) or truthy(precision.get("pure_bf16")):
        return "bfloat16"
    if truthy(precision.get("fp16")):
        return "float16"
    return _saved_dtype(precision.get("model_name_or_path"))


def _saved_dtype(model_name_or_path: Any) -> str:
    """The floating dtype ``config.json`` names."""
    if not model_name_or_path:
        return "float32"
    from transformers import AutoConfig  # lazy: only when a config is read

    try:
        config = AutoConfig.from_pretrained(str(model_name_or_path), trust_remote_code=True)
    except (OSError, ValueError):
        return "float32"
    names = (
        str(getattr(holder, key, None) or "").removeprefix("torch.")
        for holder in (config, getattr(config, "text_config", None))
        for key in ("dtype", "torch_dtype")
    )
    return next((name for name in names if name in DTYPES), "float32")


def choose_heads(scores: torch.Tensor, num_heads: int, strategy: str, seed: int) -> list[HeadRef]:
    """``num_heads`` scored heads (NaN: a layer without heads): lowest (worst), highest (best) or seeded random;
    ties broken by (layer, head)."""
    layers, heads = scores.shape
    scored = [
        (layer, head) for layer in range(layers) for head in range(heads) if not math.isnan(float(scores[layer, head]))
    ]
    if num_heads > len(scored):
        raise RecipeError(f"--heads: got {num_heads}; the model has only {len(scored)} heads.")
    refs = [HeadRef(layer, head) for layer, head in scored]
    flat = [float(scores[layer, head]) for layer, head in scored]
    if strategy == "random":
        return sorted(random.Random(seed).sample(refs, num_heads))
    order = sorted(range(len(refs)), key=lambda i: (flat[i] if strategy == "worst" else -flat[i], i))
    return [refs[i] for i in order[:num_heads]]


def pairs_fingerprint(pairs: list[collect.CalibrationPair]) -> str:
    """Identity of the calibration data: captions and image files (path, size, mtime)."""
    digest = hashlib.sha256()
    for pair in pairs:
        digest.update(pair.caption.encode())
        for image in pair.images:
            if isinstance(image, str) and os.path.isfile(image):
                stat = os.stat(image)
                digest.update(f"|{image}|{stat.st_size}|{stat.st_mtime_ns}".encode())
            else:
                digest.update(f"|{image!r}"[:256].encode())
    return digest.hexdigest()[:16]


def identity_of(recipe_args: Any, options: SelectionOptions, pairs: list[collect.CalibrationPair]) -> dict[str, Any]:
    """What the result depends on besides the settings: model, adapter, teacher, data."""
    model_args = recipe_args.model_args
    data_args = recipe_args.data_args
    adapters = model_args.adapter_name_or_path or []
    return {
        "model": model_args.model_name_or_path,
        "model_fingerprint": path_fingerprint(model_args.model_name_or_path),
        "adapter": list(adapters),
        "adapter_fingerprint": [path_fingerprint(a) for a in adapters],
        "teacher": options.teacher,
        "teacher_fingerprint": path_fingerprint(options.teacher),
        "dataset": list(options.dataset or data_args.dataset or []),
        "dataset_dir": data_args.dataset_dir,
        "data_fingerprint": pairs_fingerprint(pairs),
        "template": data_args.template,
    }


def prepare(recipe_args: Any, options: SelectionOptions) -> tuple[list[collect.CalibrationPair], dict[str, Any]]:
    """(calibration pairs, identity) after the cheap checks before weights load."""
    options.validate()
    model_args = recipe_args.model_args
    check_model_paths(
        {"model_name_or_path": model_args.model_name_or_path, "adapter_name_or_path": model_args.adapter_name_or_path},
        started="select",
    )
    check_teacher_source(options.teacher, options.teacher_feature)
    rows = load_aligned_rows(recipe_args, options.seed, options.dataset)
    source = ", ".join(options.dataset or recipe_args.data_args.dataset or [])
    usable = collect.usable_pairs(rows)
    distinct = collect.distinct_image_pairs(usable, options.seed)
    pairs = collect.sample_pairs(distinct, options.num_samples, options.seed, options.k, source, len(usable))
    notes = collect.data_notes(len(usable), len(distinct), pairs, options.num_samples)
    _warn_about_data(notes, source)
    check_model_structure(recipe_args.model_args.model_name_or_path, recipe_args.model_args.trust_remote_code)
    return pairs, {**identity_of(recipe_args, options, pairs), "data_notes": notes}


def _warn_about_data(notes: dict[str, Any], source: str) -> None:
    """Say fewer pairs than asked, rows sharing images, repeated captions (the record keeps them)."""
    if notes["rows_sharing_an_image_dropped"]:
        show(
            f"note: dataset {source}: {notes['rows_sharing_an_image_dropped']} of {notes['usable_pairs']} usable "
            f"rows reuse an image of another row; one pair per image is scored ({notes['distinct_images']} images)."
        )
    if notes["pairs_used"] < notes["pairs_requested"]:
        show(
            f"warning: {notes['pairs_used']} image-caption pairs scored, fewer than the {notes['pairs_requested']} "
            "asked for (hera_select_samples / --samples): the dataset has no more distinct images."
        )
    if notes["repeated_captions"] > notes["pairs_used"] // 10:
        show(
            f"warning: {notes['repeated_captions']} of {notes['pairs_used']} captions repeat another caption; in "
            "text mode those samples get identical head representations and tied neighbours."
        )


def tied_share(scores: torch.Tensor) -> float:
    """Share of heads whose score equals another head's score exactly."""
    values = [v for v in scores.flatten().tolist() if not math.isnan(v)]  # NaN: a layer without heads
    counts = Counter(values)
    return sum(n for n in counts.values() if n > 1) / max(len(values), 1)


def load_in_scoring_dtype(
    recipe_args: Any, device: str, dtype: str, device_map: dict[str, Any] | None = None
) -> tuple[Any, dict[str, Any], Any]:
    """(model, tokenizer module, template) loaded as LLaMA-Factory does, in compute dtype ``dtype`` (a quantized
    model keeps its storage), whole on ``device`` or placed by ``device_map``."""

    wanted = getattr(torch, dtype)
    args = copy.copy(recipe_args)
    args.model_args = copy.copy(recipe_args.model_args)
    args.model_args.compute_dtype = wanted
    model, tokenizer_module, template = load_model_for_scoring(args, device, device_map)
    keep_4bit_layout(model)  # its 4-bit heads' columns are read dequantized (training/eval_forward.py)
    floating = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if not getattr(model, "quantization_method", None) and floating - {wanted}:
        # accelerate refuses .to() on a dispatched model; an offloaded weight takes its meta dtype when loaded
        model = torch.nn.Module.to(model, wanted)
    return model, tokenizer_module, template


def score_head_neighbours(
    recipe_args: Any, options: SelectionOptions, pairs: list[collect.CalibrationPair], kept: Path | None = None
) -> HeadNeighbours:
    """``[L, H]`` MKNN scores and per-pair overlaps on CPU; the LM pass keeps its batches in ``kept``."""
    device = options.resolved_device()
    model_args = recipe_args.model_args
    meta = check_model_structure(model_args.model_name_or_path, model_args.trust_remote_code)
    # collect.layer_weights reads every o_proj weight into CPU RAM in float32: reserve those bytes
    device_map = (
        None
        if meta is None
        else device_map_for(
            meta,
            model_args.model_name_or_path,
            device,
            options.dtype,
            bits=model_args.quantization_bit,
            double_quant=model_args.double_quantization,
            reserve=(
                4 * sum(o_proj.weight.numel() for o_proj in head_projections(meta).values()),
                "its o_proj weights in float32",
            ),
            fix="Free memory, select on a machine with more (llamafactory-hera select RECIPE) and list its heads in "
            "hera_heads",
        )
    )
    del meta
    model, tokenizer_module, template = load_in_scoring_dtype(recipe_args, device, options.dtype, device_map)
    geometry = attention_geometry(model.config)
    dataset = collator = None
    if options.mode == "text":
        pooled = collect.collect_text(
            model, tokenizer_module["tokenizer"], pairs, options.batch_size, device, options.progress, kept
        )
    else:
        dataset, collator = multimodal_dataset_and_collator(
            recipe_args, model, tokenizer_module, template, options.seed, [p.row for p in pairs], options.dataset
        )
        pooled = collect.collect_multimodal(
            model, dataset, collator, list(range(len(pairs))), options.batch_size, device, options.progress, kept
        )
    weights = collect.layer_weights(model)
    del model, dataset, collator  # the collator holds the model (mRoPE)
    collect.release_memory(device)  # rank 0 may train next (hera_heads: auto)
    # float32 as in training: bf16 gives other neighbours, and under hera_heads: auto a second teacher would stay
    teacher = load_teacher(options.teacher, options.teacher_feature, device)
    # the store gives known images and keeps the rest on disk for training's precompute
    feats = collect.collect_teacher(
        teacher,
        load_image_processor(options.teacher),
        pairs,
        teacher_batch_size(options.batch_size),
        options.progress,
        store=feature_store(teacher),
        persist=True,
    )
    head_dims = {layer: geometry.head_dim_of(layer) for layer in pooled}
    return all_head_neighbours(
        pooled, weights, feats, options.k, head_dims, device, clamp=options.clamp, num_layers=geometry.num_layers
    )


def run_selection(
    recipe_args: Any, options: SelectionOptions, cache: Path | None = None
) -> tuple[SelectionResult, bool]:
    """Score and choose heads, reusing a ``cache`` folder's scores; (result, whether cached)."""
    start = time.perf_counter()
    pairs, identity = prepare(recipe_args, options)
    # scoring options, plus device and batch size for the record
    settings = {
        "num_samples": options.num_samples,
        "k": options.k,
        "mode": options.mode,
        "seed": options.seed,
        "teacher_feature": options.teacher_feature,
        "num_heads": options.num_heads,
        "strategy": options.strategy,
        "batch_size": options.batch_size,
        "device": options.resolved_device(),
        "clamp": options.clamp,
        "dtype": options.dtype,
    }
    scoring = {k: settings[k] for k in ("num_samples", "k", "mode", "seed", "teacher_feature", "clamp", "dtype")}
    key = hashlib.sha256(json.dumps([scoring, identity], sort_keys=True).encode()).hexdigest()[:24]
    path = None if cache is None else cache / f"{key}.json"
    hit = path is not None and path.is_file()
    if hit:
        cached = SelectionResult(**json.loads(path.read_text(encoding="utf-8")))
        scores = torch.tensor([[math.nan if v is None else v for v in row] for row in cached.scores])
        duration = cached.duration_s
    else:
        kept = cache_root() / "selection_passes" / f"{key}-{options.batch_size}-{settings['device']}"
        scores = score_head_neighbours(recipe_args, options, pairs, kept).scores
        shutil.rmtree(kept, ignore_errors=True)  # a later selection reads the result
        duration = time.perf_counter() - start
    chosen = choose_heads(scores, options.num_heads, options.strategy, options.seed)
    notes = {**identity.get("data_notes", {}), "tied_heads_share": round(tied_share(scores), 4)}
    if notes["tied_heads_share"] > 0.5:
        show(
            f"warning: {notes['tied_heads_share']:.0%} of the heads share their MKNN score with another head, so the "
            "choice among them is arbitrary. Repeated captions or too few pairs are the usual cause: score on more "
            "distinct image-caption pairs."
        )
    layers, heads = scores.shape
    ranking = sorted(
        (
            {"head": str(HeadRef(layer, head)), "score": float(scores[layer, head])}
            for layer in range(layers)
            for head in range(heads)
            if not math.isnan(float(scores[layer, head]))
        ),
        key=lambda r: r["score"],
    )
    stored = [[None if math.isnan(v) else v for v in row] for row in scores.tolist()]  # JSON: no NaN
    result = SelectionResult(
        scores=stored,
        selected=[str(h) for h in chosen],
        strategy=options.strategy,
        ranking=ranking,
        settings={**settings, "num_samples_used": len(pairs)},
        identity=identity,
        versions=recorded_versions(),
        num_pairs=len(pairs),
        duration_s=round(duration, 3),
        data_notes=notes,
    )
    if path is not None and not hit:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, result.to_json() + "\n")
    return result, hit
