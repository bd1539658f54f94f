"""plan for stages that are not an SFT step: HARC's optimizer step and RAH-LoRA's calibration."""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from llamafactory_hera.plan import count, estimate, timing
from llamafactory_hera.plan.cards import Card
from llamafactory_hera.plan.measured import measured_kind
from llamafactory_hera.plan.report import GiB, duration, fit_line, memory_table, span
from llamafactory_hera.plan.timing import Network

STREAMS = {"harmful": 6, "harmless": 4, "pseudo": 2}  # HARC's micro-batch rows per stream (its keys' defaults)


def trained_parts(recipe: dict) -> tuple[str, ...]:
    """A full fine-tune's trained parts under the freeze_* keys (default: the language model)."""
    keys = {
        "vision": ("freeze_vision_tower", True),
        "projector": ("freeze_multi_modal_projector", True),
        "language": ("freeze_language_model", False),
    }
    return tuple(name for name, (key, frozen) in keys.items() if not recipe.get(key, frozen))


def _seconds(flops: float, ops: float, card: Card, bits: int | None) -> str:
    """One GPU's passes outside the step, timed as a LoRA step in ``bits``."""
    return duration(timing.seconds(flops, ops, measured_kind(True, bits), card))


def _head(config: Any, counts: dict[str, float], what: str) -> str:
    return (
        f"  {config.architectures[0] if config.architectures else config.model_type}: "
        f"{counts['params'] / 1e9:.2f} B parameters; {what}"
    )


def harc(
    recipe: dict, path: Path, config: Any, setup: estimate.Setup, card: Card, started: float, network: Network
) -> str:
    """One HARC optimizer step and its directions' extractions (docs/cost.md, "HARC")."""
    # per_device_train_batch_size counts composed micro-batches, each of the streams' rows (harc/raw_checks.py)
    composed = setup.batch
    rows = {name: composed * int(recipe.get(f"harc_batch_{name}", default)) for name, default in STREAMS.items()}
    length = int(recipe.get("harc_max_length", 256))
    setup = replace(setup, batch=sum(rows.values()), cutoff=length)
    shape = count.Shape(
        setup.batch,
        length,
        0,
        int(recipe.get("lora_rank", 8)),
        int(recipe.get("lora_alpha") or 2 * int(recipe.get("lora_rank", 8))),
        bool(setup.bits),
        setup.checkpointing,
        reference_rows=rows["harmless"] + rows["pseudo"],
    )
    counts = count.scaled(config, {"harc": shape}, 0)["harc"]
    parts = estimate.memory(counts, setup)
    per_row = (counts["flops"] - counts["reference"]) / setup.batch
    lines = [
        f"plan: {path} on {setup.gpus} x {card.name} ({card.memory_gib:g} GiB)",
        _head(
            config,
            counts,
            f"stage harc, LoRA, {estimate.ENGINES[setup.engine]}, micro-batch of "
            + " + ".join(f"{n} {name}" for name, n in rows.items())
            + f" rows of {length} tokens "
            f"(harc_max_length, worst case) x accumulation {setup.accumulation}",
        ),
    ]
    lines += memory_table({"harc": parts}, "harc")
    lines.append(fit_line(parts["needed"], card))
    lines.append(
        f"  per micro-batch: {counts['flops'] / 1e12:.2f} TFLOPs = forward + backward "
        + ", ".join(f"{name} {n * per_row / 1e12:.2f}" for name, n in rows.items())
        + f" + KL reference forward (retain rows, no grad) {counts['reference'] / 1e12:.2f}"
    )
    comm = estimate.communicated(counts, setup)
    t = timing.times(counts["flops"], counts["ops"], setup, card, 1000, length, comm, network)
    link = f", communication {t['communication']:.2f} s on {t['link']}" if any(comm) else ""
    lines.append(
        f"  step {span(t['step'], 's')}: the longest of compute {span(t['compute'], 's')} and host "
        f"{span(t['host'][::2], 's')} ({counts['ops']:,.0f} aten ops a micro-batch){link}, timed as the measured "
        f"LoRA steps are (docs/cost.md); run of {t['steps'][1]} steps: {duration(t['run'])}, "
        f"{span(t['gpu-hours'], '')} GPU-hours"
    )
    sets = 5 if recipe.get("harc_harmful_completions") else 2
    refresh = int(recipe.get("harc_refresh_steps", 100))
    times = 1 + (t["steps"][1] - 1) // refresh if refresh > 0 else 1
    extracted = sets * int(recipe.get("harc_extract_samples", 300))
    one = counts["reference"] / shape.reference_rows * extracted
    lines.append(
        f"  directions: {extracted} rows forward ({sets} row sets), {times} times (start + refreshes): "
        f"{one * times / 1e12:.1f} TFLOPs, {_seconds(one * times, 0, card, setup.bits)} of compute"
    )
    lines.append(f"(counted in {time.time() - started:.0f} s on this CPU)")
    return "\n".join(lines)


def rah(
    recipe: dict, path: Path, config: Any, setup: estimate.Setup, card: Card, started: float, network: Network
) -> str:
    """RAH-LoRA's calibration, placed as ``llamafactory_hera.placement`` does (docs/cost.md, "RAH-LoRA")."""
    size = int(recipe.get("rah_batch_size", 1))
    max_pixels = int(recipe.get("image_max_pixels", estimate.DEFAULT_MAX_PIXELS))
    shapes = {
        probe: count.Shape(rows, setup.cutoff, max_pixels, None, 0, bool(setup.bits), False, parts=(), probe=probe)
        for probe, rows in (("isal", size), ("caf", 1))
    }
    counts = {probe: count.scaled(config, {probe: shape}, 0)[probe] for probe, shape in shapes.items()}
    frozen = replace(setup, lora=False, engine="ddp", gpus=1)
    parts = {probe: estimate.memory({**c, "trainable": 0}, frozen) for probe, c in counts.items()}
    weights = parts["isal"]["parameters"]
    probe_peak = max(p["activations"] + p["temporaries"] for p in parts.values())
    room = card.memory_gib * GiB - estimate.RESERVE - probe_peak
    gpus = max(1, math.ceil(weights / room)) if room > 0 else None
    lines = [
        f"plan: {path} on {card.name} ({card.memory_gib:g} GiB)",
        _head(
            config,
            counts["isal"],
            f"stage rah (training-free: calibration passes, no optimizer), "
            f"{f'{setup.bits}-bit' if setup.bits else 'bf16'}, rows of {setup.cutoff} tokens (cutoff_len, "
            "worst case)",
        ),
    ]
    lines += memory_table(parts, "rah")
    where = (
        "whole on one GPU"
        if gpus == 1
        else f"over {gpus} GPUs by placement (device_map), or the rest in CPU RAM on fewer"
        if gpus
        else "does NOT fit: the probe's own tensors exceed the card"
    )
    lines.append(
        f"  loads {where}: {weights / GiB:.2f} GiB of weights + {probe_peak / GiB:.2f} GiB of the probe + "
        f"{estimate.RESERVE / GiB:.0f} GiB reserve"
    )
    samples = int(recipe.get("rah_samples", 100))
    probes = int(recipe.get("rah_probe_samples", 32))
    kl = int(recipe.get("rah_kl_samples", 8))
    tries = int(recipe.get("rah_halvings", 5)) + 1
    passes = math.ceil(samples / size)
    isal = counts["isal"]["flops"] * passes
    caf = counts["caf"]["flops"] * probes
    per_try = counts["isal"]["flops"] / size * kl
    lines.append(
        f"  I-SAL: {samples} rows forward, {isal / 1e12:.1f} TFLOPs, "
        f"{_seconds(isal, counts['isal']['ops'] * passes, card, setup.bits)}; CAF: {probes} rows forward + "
        f"backward, {caf / 1e12:.1f} TFLOPs, {_seconds(caf, counts['caf']['ops'] * probes, card, setup.bits)}"
    )
    lines.append(
        f"  each target head: 1-{tries} forwards of {kl} rows, {per_try / 1e12:.2f} TFLOPs each, "
        f"{_seconds(per_try, counts['isal']['ops'] * math.ceil(kl / size), card, setup.bits)} (targets are known "
        "after scoring; timed as LoRA steps are, docs/cost.md)"
    )
    lines.append(f"(counted in {time.time() - started:.0f} s on this CPU)")
    return "\n".join(lines)


STAGES = {"harc": harc, "rah": rah}
