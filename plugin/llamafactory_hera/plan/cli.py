"""``llamafactory-hera plan RECIPE``: a run's memory per GPU, fit (and what would fit), FLOPs, time and GPU-hours,
before renting. Reads the model's config.json only (no weights, no network)."""

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
from llamafactory_hera.plan.cards import CARDS, DEFAULT_CARD
from llamafactory_hera.plan.keys import checked, with_defaults
from llamafactory_hera.plan.report import fit_line, memory_table, time_lines
from llamafactory_hera.plan.timing import Network
from llamafactory_hera.runtime.errors import RecipeError
from llamafactory_hera_patches.recipe.host_arguments import liger_applies_to

GiB = estimate.GIB
LAUNCH_LINE = re.compile(r"accelerate launch --config_file (\S+)")  # a recipe header's launch command


def add_verbs(commands: Any) -> dict[str, Callable[[argparse.Namespace], None]]:
    parser = commands.add_parser(
        "plan",
        help="a recipe's memory per GPU, fit, FLOPs, time and GPU-hours, before renting (docs/cost.md)",
        description="Count one training step of the recipe on this CPU (its model's config.json, no weights) and "
        "print its memory per GPU by category, whether it fits the card and what would, its FLOPs and its time. "
        "KEY=VALUE overrides and the options may stand anywhere after the recipe.",
    )
    parser.add_argument("recipe", type=Path, help="the training recipe (YAML)")
    # argparse reads positionals in their first run only (``plan R --gpu X k=v`` would refuse k): see _line
    parser.add_argument(
        "rest", nargs=argparse.REMAINDER, metavar="KEY=VALUE", help="recipe keys as on the training line"
    )
    _options(parser)
    return {"plan": lambda args: print(plan(*_line(args)))}


def _options(parser: argparse.ArgumentParser, suppress: bool = False) -> None:
    """``plan``'s options (``suppress``: absent unless given, for the rest of the line)."""
    network = Network()

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "--gpus",
        type=_positive,
        default=default(None),
        help="GPUs of the run (default: the accelerate config's, else 1)",
    )
    parser.add_argument(
        "--gpu", default=default(DEFAULT_CARD), help=f"the card: {', '.join(CARDS)} (default {DEFAULT_CARD})"
    )
    parser.add_argument(
        "--accelerate-config", type=Path, default=default(None), help="the accelerate config the run is launched with"
    )
    parser.add_argument(
        "--gpus-per-node",
        type=_positive,
        default=default(network.gpus_per_node),
        help=f"GPUs in a node (default {network.gpus_per_node}); a run on more spans nodes",
    )
    parser.add_argument(
        "--node-link",
        type=_node_link,
        default=default((network.cards, network.gbits)),
        metavar="CARDSxGBITS",
        help=f"the network between nodes: cards per node x Gb/s each way (default {network.cards}x{network.gbits:g}; "
        "a node with a 400 Gb/s card per GPU: 8x400)",
    )


def _line(args: argparse.Namespace) -> tuple:
    """``plan``'s arguments, options read wherever they stand among the keys."""
    rest = argparse.ArgumentParser(prog="llamafactory-hera plan", argument_default=argparse.SUPPRESS)
    rest.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    _options(rest, suppress=True)
    given = vars(args) | vars(rest.parse_intermixed_args(args.rest))
    network = Network(given["gpus_per_node"], *given["node_link"])
    return args.recipe, given.get("overrides", []), given["gpus"], given["gpu"], given["accelerate_config"], network


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of GPUs (1 or more)")
    return int(text)


def _node_link(text: str) -> tuple[int, float]:
    cards, _, gbits = text.lower().partition("x")
    try:
        found = (int(cards), float(gbits))
    except ValueError:
        found = (0, 0.0)
    if found[0] < 1 or found[1] <= 0:
        raise argparse.ArgumentTypeError(f"'{text}' is not CARDSxGBITS (network cards per node x Gb/s, e.g. 8x400)")
    return found


def _model_config(name: str, recipe_text: str) -> Any:
    from transformers import AutoConfig  # lazy: seconds, needed only once a recipe is read

    try:
        return AutoConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as err:
        missing = str(err).splitlines()[0]
    with contextlib.suppress(OSError, ValueError):  # a LLaVA-1.5 model compose has not built: from its parts
        if (composed := families.composed_config(recipe_text)) is not None:
            return composed
    raise RecipeError(
        f"model_name_or_path: no config.json of {name} at hand ({missing}); plan reads it without "
        f"network: download it first (hf download {name} config.json; a compose command's: its LLM's "
        "and vision tower's) or point model_name_or_path to a local copy."
    )


def plan(
    recipe_path: Path,
    overrides: list[str],
    gpus: int | None,
    gpu: str,
    accelerate_config: Path | None,
    network: Network | None = None,
) -> str:
    """plan's report: the recipe and its overrides read as training reads them."""
    from llamafactory_hera_patches.recipe.recipe_file import (
        launch_recipe,  # lazy: the patches read recipes as LLaMA-Factory
    )

    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"{item}: KEY=VALUE expected, as on llamafactory-cli's line (e.g. cutoff_len=2048).")
    with _quiet():  # LLaMA-Factory's import line about its version check
        recipe = launch_recipe(["llamafactory-cli", "train", str(recipe_path), *overrides])
    if not isinstance(recipe, dict):
        raise RecipeError(f"recipe: {recipe_path} is not a recipe file (.yaml, .yml, .json); name a training recipe.")
    return plan_recipe(
        recipe, recipe_path, gpus, gpu, accelerate_config, recipe_path.read_text(encoding="utf-8"), network
    )


def plan_recipe(
    recipe: dict,
    recipe_path: Path,
    gpus: int | None = None,
    gpu: str = DEFAULT_CARD,
    accelerate_config: Path | None = None,
    recipe_text: str = "",
    network: Network | None = None,
) -> str:
    """The report for ``recipe`` (or a LlamaBoard panel's arguments); ``recipe_text`` may name a compose command."""
    started = time.time()
    network = network or Network()
    card = CARDS.get(gpu)
    if card is None:
        raise RecipeError(f"--gpu: unknown card '{gpu}'; known: {', '.join(CARDS)}.")
    # lazy: transformers, peft, datasets (seconds)
    from llamafactory_hera.hera.parsed_checks import check_heads_of
    from llamafactory_hera.hera.preparation_checks import check_contrastive_geometry, contrastive_geometry
    from llamafactory_hera.plan import count, lengths, methods

    method_args = checked(recipe)
    keys = with_defaults(recipe, method_args)  # every figure below at training's defaults
    if (stage := keys["stage"]) not in ("sft", "pt", "hera", *methods.STAGES):
        raise RecipeError(
            f"stage: plan counts sft, pt, hera, {', '.join(methods.STAGES)}, not {stage} (its "
            "reference model and paired rows are not modelled)."
        )
    setup = estimate.setup_of(keys, recipe_path.parent, gpus, accelerate_config)
    with _quiet():  # transformers' info lines, which LLaMA-Factory's import turns on
        config = _model_config(str(keys["model_name_or_path"]), recipe_text)
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
            return methods.STAGES[setup.stage](keys, recipe_path, config, setup, card, started, network)
    max_pixels = int(keys["image_max_pixels"] or estimate.DEFAULT_MAX_PIXELS)
    image = families.images(config, max_pixels)
    with _quiet():
        sizes = lengths.lengths_of(recipe, recipe_path.parent, setup.batch, setup.cutoff, image.tokens if image else 0)
    vision = getattr(config, "vision_config", None)
    if sizes.rows and image and hasattr(vision, "spatial_merge_size"):  # the sampled image tokens as one square image
        side = math.isqrt(max(sizes.image_tokens - 1, 0)) + 1
        max_pixels = (side * vision.patch_size * vision.spatial_merge_size) ** 2
        image = families.images(config, max_pixels)
    hera = setup.stage == "hera"
    geometry = None
    if hera:  # the contrastive set training forms at this micro-batch and GPU count, queue included, checked as it is
        geometry = contrastive_geometry(method_args, setup.batch, setup.gpus)
        check_contrastive_geometry(geometry, method_args)
    heads, head_layers = (
        count.head_layers(
            method_args.hera_heads,
            method_args.hera_select_num_heads,
            check_heads_of(method_args, config, str(keys["model_name_or_path"])).num_heads,
        )
        if hera
        else ([], 0)
    )
    shape = count.Shape(
        setup.batch,
        max(sizes.peak, image.tokens + 8) if image else sizes.peak,
        max_pixels,
        int(keys["lora_rank"]) if setup.lora else None,
        int(keys["lora_alpha"]),
        bool(setup.bits),
        setup.checkpointing,
        liger=setup.liger,
        parts=methods.trained_parts(keys),
    )
    arm = "hera" if hera else "sft"
    shapes = {"sft": shape}
    if geometry:
        hera_keys = {**keys, "heads": heads, "hera_candidates": geometry.largest}
        shapes["hera"] = count.Shape(**{**shape.__dict__, "hera": hera_keys})
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
    nodes = network.nodes(setup.gpus)
    lines = [
        f"plan: {recipe_path} on {setup.gpus} x {card.name} ({card.memory_gib:g} GiB)"
        + (f", {nodes} nodes of {network.gpus_per_node} (--gpus-per-node)" if nodes > 1 else ""),
        f"  {config.architectures[0] if config.architectures else config.model_type}: "
        f"{counts[arm]['params'] / 1e9:.2f} B parameters ({counts[arm]['trainable'] / 1e6:.1f} M trained); stage "
        f"{setup.stage}, {'LoRA' if setup.lora else 'full'}{f', {setup.bits}-bit' if setup.bits else ''}, "
        f"{estimate.ENGINES[setup.engine]}, micro-batch {setup.batch} x accumulation {setup.accumulation}, "
        f"cutoff_len {setup.cutoff}, Liger {'on' if setup.liger else 'off'}, gradient checkpointing "
        f"{'on' if setup.checkpointing else 'off'}",
        *(f"  note: {note}" for note in setup.notes),
        f"  {sizes.line}",
    ]
    if geometry:
        lines.append(
            f"  HeRA: contrastive set up to {geometry.largest} samples; queue "
            f"{geometry.queue or 'off'} ({geometry.queue_reason})"
        )
    lines += memory_table(parts, arm)
    lines.append(fit_line(parts[arm]["needed"], card))
    if not fits:
        lines.append("    each line below, added to this plan command, plans its change:")
        for change, needed in estimate.fixes(counts, setup, card, arm, image.tokens if image else 0):
            verdict = "fits" if card.holds(needed) else "still too much"
            lines.append(f"    {' '.join(change)}: {needed / GiB:.2f} GiB, {verdict}")
    lines += time_lines(counts, setup, card, rows, keys, sizes, network)
    lines.append(f"(counted in {time.time() - started:.0f} s on this CPU)")
    return "\n".join(lines)


def board_report(args: dict) -> str:
    """The report for LlamaBoard's run arguments on this machine's GPUs, or the line why it cannot be counted."""
    import torch  # lazy: seconds, which --help needs not

    try:
        return plan_recipe(args, Path("LlamaBoard"), torch.cuda.device_count() or None, card_here())  # from the cwd
    except (RecipeError, ValueError) as err:
        return str(err)


def card_here() -> str:
    """This machine's first GPU among :data:`CARDS` (by name, then memory); else the default card."""
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


class _quiet:  # noqa: N801  warnings on the fake step, LLaMA-Factory's info lines (it sets transformers' verbosity)
    def __enter__(self) -> None:
        self.level = logging.root.manager.disable
        logging.disable(logging.WARNING)

    def __exit__(self, *_: object) -> None:
        logging.disable(self.level)
