"""``llamafactory-hera plan RECIPE``: a run's memory per GPU, whether it fits a card (and what would), its FLOPs, time
and GPU-hours, before renting one. Reads the model's config.json only (no weights, no network)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from llamafactory_hera.plan import estimate, families
from llamafactory_hera.plan.cards import CARDS, DEFAULT_CARD, Card, mfu
from llamafactory_hera.plan.report import duration, fit_line, memory_table, span
from llamafactory_hera_patches.errors import RecipeError
from llamafactory_hera_patches.recipe.host_arguments import liger_applies_to

GiB = estimate.GIB
LAUNCH_LINE = re.compile(r"accelerate launch --config_file (\S+)")  # a recipe header's launch command


def add_verbs(commands: Any) -> dict[str, Callable[[argparse.Namespace], None]]:
    """Add ``plan`` to the ``llamafactory-hera`` sub-command parsers; verb -> handler."""
    parser = commands.add_parser(
        "plan",
        help="a recipe's memory per GPU, fit, FLOPs, time and GPU-hours, before renting (docs/cost.md)",
        description="Count one training step of the recipe on this CPU (its model's config.json, no weights) and "
        "print its memory per GPU by category, whether it fits the card and what would, its FLOPs and its time.",
    )
    parser.add_argument("recipe", type=Path, help="the training recipe (YAML)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe keys as on llamafactory-cli's line")
    parser.add_argument("--gpus", type=_positive, help="GPUs of the run (default: the accelerate config's, else 1)")
    parser.add_argument("--gpu", default=DEFAULT_CARD, help=f"the card: {', '.join(CARDS)} (default {DEFAULT_CARD})")
    parser.add_argument("--accelerate-config", type=Path, help="the accelerate config the run is launched with")
    return {"plan": lambda args: print(plan(args.recipe, args.overrides, args.gpus, args.gpu, args.accelerate_config))}


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of GPUs (1 or more)")
    return int(text)


def _model_config(name: str, recipe_text: str) -> Any:
    from transformers import AutoConfig  # lazy: transformers' import takes seconds, needed only once a recipe is read

    try:
        return AutoConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as err:
        missing = str(err).splitlines()[0]
    with contextlib.suppress(OSError, ValueError):  # a LLaVA-1.5 model compose has not built yet: from its parts
        if (composed := families.composed_config(recipe_text)) is not None:
            return composed
    raise RecipeError(
        f"model_name_or_path: no config.json of {name} at hand ({missing}); plan reads it without "
        f"network: download it first (hf download {name} config.json; a compose command's: its LLM's "
        "and vision tower's) or point model_name_or_path to a local copy."
    )


def plan(recipe_path: Path, overrides: list[str], gpus: int | None, gpu: str, accelerate_config: Path | None) -> str:
    """The report ``llamafactory-hera plan`` prints: the recipe and its overrides read as training reads them."""
    from llamafactory_hera_patches.launch import launch_recipe  # lazy: LLaMA-Factory's arguments (seconds)

    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"{item}: KEY=VALUE expected, as on llamafactory-cli's line (e.g. cutoff_len=2048).")
    with _quiet():  # LLaMA-Factory's import line about its version check
        recipe = launch_recipe(["llamafactory-cli", "train", str(recipe_path), *overrides])
    if not isinstance(recipe, dict):
        raise RecipeError(f"recipe: {recipe_path} is not a recipe file (.yaml, .yml, .json); name a training recipe.")
    return plan_recipe(recipe, recipe_path, gpus, gpu, accelerate_config, recipe_path.read_text(encoding="utf-8"))


def checked(recipe: dict) -> Any:
    """``recipe`` through training's checks before LLaMA-Factory parses it, this machine's aside (its engines, model
    paths, stack, bf16, the checkpoint it resumes from): the method's keys parsed and checked (heads named in a local
    model), every LLaMA-Factory key known and of its type, ``lora_target``. The method's arguments (None: a
    LLaMA-Factory stage)."""
    # lazy: the patches' stage and launch checks import LLaMA-Factory's and transformers' pieces
    from llamafactory_hera.recipe.checks import check_raw_recipe
    from llamafactory_hera_patches.recipe.arguments import keys_of, split_args
    from llamafactory_hera_patches.stage import check_host_stage, method_arguments

    host, own, method = split_args(dict(recipe))
    if method is not None:
        return method_arguments(method, keys_of(method, own)[0], host, machine=False)
    check_host_stage(host, {})
    check_raw_recipe(host, str(host.get("stage") or "sft"), machine=False)
    return None


def plan_recipe(
    recipe: dict,
    recipe_path: Path,
    gpus: int | None = None,
    gpu: str = DEFAULT_CARD,
    accelerate_config: Path | None = None,
    recipe_text: str = "",
) -> str:
    """The report for ``recipe`` (read from ``recipe_path``, whose text ``recipe_text`` may name a compose command, or
    a LlamaBoard panel's arguments)."""
    started = time.time()
    card = CARDS.get(gpu)
    if card is None:
        raise RecipeError(f"--gpu: unknown card '{gpu}'; known: {', '.join(CARDS)}.")
    # lazy: transformers, peft, datasets (seconds)
    from llamafactory_hera.hera.checks import check_heads_of
    from llamafactory_hera.plan import count, lengths, methods

    method_args = checked(recipe)
    if (stage := recipe.get("stage", "sft")) not in ("sft", "pt", "hera", *methods.STAGES):
        raise RecipeError(
            f"stage: plan counts sft, pt, hera, {', '.join(methods.STAGES)}, not {stage} (its "
            "reference model and paired rows are not modelled)."
        )
    setup = estimate.setup_of(recipe, recipe_path.parent, gpus, accelerate_config)
    with _quiet():  # transformers' info lines as it reads the config (LLaMA-Factory's import turns them on)
        config = _model_config(str(recipe.get("model_name_or_path")), recipe_text)
    if accelerate_config is None and (launch := LAUNCH_LINE.search(recipe_text)):
        setup = replace(
            setup,
            notes=(
                *setup.notes,
                f"launch: planned as {estimate.ENGINES[setup.engine]} on "
                f"{setup.gpus} GPU(s), no --accelerate-config given; the recipe's header "
                f"names a launch with accelerate launch --config_file {launch[1]}: plan it "
                f"with --accelerate-config {launch[1]}",
            ),
        )
    liger = liger_applies_to(config.model_type)
    if setup.liger and not liger:
        setup = replace(
            setup,
            liger=False,
            notes=(
                *setup.notes,
                f"enable_liger_kernel: LLaMA-Factory does not patch {config.model_type}; the run trains without Liger",
            ),
        )
    if setup.stage in methods.STAGES:  # HARC's step, RAH-LoRA's calibration
        with warnings.catch_warnings(), _quiet():
            warnings.simplefilter("ignore")
            return methods.STAGES[setup.stage](recipe, recipe_path, config, setup, card, started)
    max_pixels = int(recipe.get("image_max_pixels", estimate.DEFAULT_MAX_PIXELS))
    image = families.images(config, max_pixels)
    with _quiet():
        sizes = lengths.lengths_of(recipe, recipe_path.parent, setup.batch, setup.cutoff, image.tokens if image else 0)
    vision = getattr(config, "vision_config", None)
    if sizes.rows and image and hasattr(vision, "spatial_merge_size"):  # the sampled image tokens as one square image
        side = math.isqrt(max(sizes.image_tokens - 1, 0)) + 1
        max_pixels = (side * vision.patch_size * vision.spatial_merge_size) ** 2
        image = families.images(config, max_pixels)
    hera = setup.stage == "hera"
    heads, head_layers = (
        count.head_layers(
            method_args.hera_heads,
            method_args.hera_select_num_heads,
            check_heads_of(method_args, config, str(recipe.get("model_name_or_path"))).num_heads,
        )
        if hera
        else ([], 0)
    )
    shape = count.Shape(
        setup.batch,
        max(sizes.peak, image.tokens + 8) if image else sizes.peak,
        max_pixels,
        int(recipe.get("lora_rank", 8)) if setup.lora else None,
        int(recipe.get("lora_alpha", 16)),
        bool(setup.bits),
        setup.checkpointing,
        liger=setup.liger,
        parts=methods.trained_parts(recipe),
    )
    arm = "hera" if hera else "sft"
    shapes = {"sft": shape} | (
        {"hera": count.Shape(**{**shape.__dict__, "hera": {**recipe, "heads": heads}})} if hera else {}
    )
    with warnings.catch_warnings(), _quiet():
        warnings.simplefilter("ignore")
        counts = count.scaled(config, shapes, head_layers if hera else 0)
        parts = {name: estimate.memory(c, setup) for name, c in counts.items()}
        fits = card.holds(parts[arm]["needed"])
        if not fits:
            more = {}  # the arm last: its layer increments are counted already
            if liger and not setup.liger:
                more[f"{arm}+liger"] = count.Shape(**{**shapes[arm].__dict__, "liger": True})
            if setup.lora and not setup.bits:
                more[f"{arm}+qlora"] = count.Shape(**{**shapes[arm].__dict__, "quantized": True})
            counts |= count.scaled(config, more | {arm: shapes[arm]}, head_layers if hera else 0)
    rows = sizes.rows or estimate.dataset_rows(recipe, recipe_path.parent)
    lines = [
        f"plan: {recipe_path} on {setup.gpus} x {card.name} ({card.memory_gib:g} GiB)",
        f"  {config.architectures[0] if config.architectures else config.model_type}: "
        f"{counts[arm]['params'] / 1e9:.2f} B parameters ({counts[arm]['trainable'] / 1e6:.1f} M trained); stage "
        f"{setup.stage}, {'LoRA' if setup.lora else 'full'}{f', {setup.bits}-bit' if setup.bits else ''}, "
        f"{estimate.ENGINES[setup.engine]}, micro-batch {setup.batch} x accumulation {setup.accumulation}, "
        f"cutoff_len {setup.cutoff}, Liger {'on' if setup.liger else 'off'}, gradient checkpointing "
        f"{'on' if setup.checkpointing else 'off'}",
        *(f"  note: {note}" for note in setup.notes),
        f"  {sizes.line}",
    ]
    lines += memory_table(parts, arm)
    lines.append(fit_line(parts[arm]["needed"], card))
    if not fits:
        for change, needed in estimate.fixes(counts, setup, card, arm):
            verdict = "fits" if card.holds(needed) else "still too much"
            lines.append(f"    {change}: {needed / GiB:.2f} GiB, {verdict}")
    lines += _time_lines(counts, setup, card, rows or 1000, rows is not None, recipe, hera, sizes)
    lines.append(f"(counted in {time.time() - started:.0f} s on this CPU)")
    return "\n".join(lines)


def board_report(args: dict) -> str:
    """The report for LlamaBoard's run arguments ``args`` (the run Start would launch) on this machine's GPUs; where
    the run cannot be counted, the one line saying why."""
    import torch  # lazy: seconds, which --help needs not

    try:
        return plan_recipe(args, Path("LlamaBoard"), torch.cuda.device_count() or None, card_here())  # from the cwd
    except (RecipeError, ValueError) as err:
        return str(err)


def card_here() -> str:
    """The card of this machine's first GPU among :data:`CARDS` (its model in the device's name, the nearest memory);
    none or unknown: the default card, which the report's first line names."""
    import torch  # lazy: seconds, which --help needs not

    if not torch.cuda.is_available():
        return DEFAULT_CARD
    device = torch.cuda.get_device_properties(0)
    name = device.name.upper().replace(" ", "")
    known = [
        card
        for key, card in CARDS.items()
        if key.removeprefix("RTX-").split("-")[0] in name and ("PCIE" in name) == key.endswith("PCIe")
    ]
    return min(known, key=lambda card: abs(card.memory_gib - device.total_memory / GiB)).name if known else DEFAULT_CARD


def _time_lines(
    counts: dict[str, dict[str, float]],
    setup: estimate.Setup,
    card: Card,
    rows: int,
    known: bool,
    recipe: dict,
    hera: bool,
    sizes: Any,
) -> list[str]:
    (low, high), source = mfu(setup.engine, setup.bits)
    band = f"{low:.0%}-{high:.0%} MFU ({source}) of {card.bf16_tflops:g} TFLOP/s bf16"
    lines = []
    for name in ("sft", "hera") if hera else ("sft",):
        ratio = sizes.padded / sizes.peak  # counted at the peak; at the mean: attention quadratic in the length
        attention = counts[name]["attention"] * ratio**2
        flops = (counts[name]["flops"] - counts[name]["attention"]) * ratio + attention
        comm = estimate.communicated(counts[name], setup)
        t = estimate.times(flops, setup, card, rows, sizes.mean, comm)
        lines.append(
            f"  {name.upper()}: {flops * setup.accumulation / 1e12:.1f} TFLOPs per GPU per optimizer step "
            f"(attention {attention / flops:.1%} of them); at {band}: step "
            f"{span(t['step'], 's')}, {span(t['tokens/s'], '')} tokens/s per node"
        )
        if any(comm):
            received = (setup.accumulation * comm[0] + comm[1]) / 1e9
            lines.append(
                f"    communication: {received:,.1f} GB received per GPU per step under "
                f"{estimate.ENGINES[setup.engine]} (docs/cost.md), {t['communication']:.2f} s "
                f"on {card.link} ({card.link_gbs:g} GB/s datasheet, half each way), overlapped with the "
                "compute as the engine prefetches (each micro-step the longer of the two): "
                f"{span(tuple(t['communication'] / s * 100 for s in t['step']), '%')} of the step"
            )
        lines.append(
            f"    epoch of {rows} rows{'' if known else ' (the dataset is not at hand: per 1000 rows)'}, "
            f"{t['steps'][0]} steps: {duration(t['epoch'])}; run of {t['steps'][1]} steps: "
            f"{duration(t['run'])}, {span(t['gpu-hours'], '')} GPU-hours"
        )
    if hera:
        teacher = card.seconds(estimate.teacher_flops(rows), mfu("ddp")[0])  # bf16, one GPU
        line = f"  teacher precompute ({rows} images, DINOv2-L, one GPU): {duration(teacher)}"
        if recipe.get("hera_heads", "auto") == "auto":
            select = int(recipe.get("hera_select_samples", 1000))
            seconds = card.seconds(estimate.selection_flops(counts["hera"], select), mfu("ddp", setup.bits)[0])
            line += f"; head selection ({select} pairs, one GPU): {duration(seconds)}"
            if not card.holds(2 * counts["hera"]["params"]):
                line += (
                    " of compute; the bf16 model exceeds one GPU, whose CPU-offloaded layers are copied in every "
                    "batch: select first over the node's GPUs (llamafactory-hera select)"
                )
        lines.append(line)
    return lines


class _quiet:  # noqa: N801  transformers' and torch's warnings about the fake step, LLaMA-Factory's info lines while
    # it reads the rows (it sets transformers' verbosity itself): silenced
    def __enter__(self) -> None:
        self.level = logging.root.manager.disable
        logging.disable(logging.WARNING)

    def __exit__(self, *_: object) -> None:
        logging.disable(self.level)
