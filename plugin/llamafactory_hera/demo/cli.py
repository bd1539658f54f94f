"""The demos' dispatcher: ``python -m llamafactory_hera.demo --method hera|rah|harc ...``, each into its own
``DIR/<method>/``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import ModuleType

from llamafactory_hera.demo import harc as harc_demo
from llamafactory_hera.demo import hera as hera_demo
from llamafactory_hera.demo import rah as rah_demo
from llamafactory_hera.demo.folders import DemoError, mark, prepare_folder
from llamafactory_hera.demo.runner import DemoContext, find_cli, offline_env, say
from llamafactory_hera_patches.stacks import family_too_new, installed

# method -> module: TITLE, FAMILIES (first: default), DEFAULT_STEPS (None: no step), ASSETS_NAME (under DIR),
# OWN_OUTPUTS (names in DIR/<method> it replaces), run(ctx) -> exit code
DEMOS: dict[str, ModuleType] = {"hera": hera_demo, "rah": rah_demo, "harc": harc_demo}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options; a family or ``--steps`` the method cannot take is an error."""
    families = sorted({family for module in DEMOS.values() for family in module.FAMILIES})
    parser = argparse.ArgumentParser(
        prog="python -m llamafactory_hera.demo",
        description="Run one method on a tiny offline model with the stock llamafactory-cli and show its outputs. "
        "Each method writes into OUTPUT/<method>/ and leaves the other methods' folders alone.",
    )
    parser.add_argument(
        "--method",
        choices=tuple(DEMOS),
        default="hera",
        help="hera: a HeRA training run (default); rah: a RAH-LoRA calibration; harc: HARC safety "
        "fine-tuning of a tiny Llama-3, with its refusal rates before and after",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("demo_output"),
        help="the demos' folder; each method writes recipe.yaml, train.log and run/ into "
        "OUTPUT/<method>/ (default: ./demo_output)",
    )
    parser.add_argument(
        "--assets",
        type=Path,
        default=None,
        help="folder of the tiny assets, built if missing (default: OUTPUT/assets for hera and rah, "
        "OUTPUT/assets_harc for harc)",
    )
    parser.add_argument(
        "--family",
        choices=families,
        default=None,
        help="tiny model family: "
        + "; ".join(f"{name}: {', '.join(module.FAMILIES)}" for name, module in DEMOS.items())
        + " (default: the first)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="optimizer steps (default: "
        + ", ".join(f"{name} {module.DEFAULT_STEPS}" for name, module in DEMOS.items() if module.DEFAULT_STEPS)
        + "; rah takes none)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty OUTPUT/<method>/run in a folder the demo did not make (its own "
        "folder is always reused)",
    )
    shown = parser.add_mutually_exclusive_group()
    shown.add_argument(
        "--verbose", action="store_true", help="show LLaMA-Factory's whole output (always in OUTPUT/<method>/train.log)"
    )
    shown.add_argument("--quiet", action="store_true", help="show no training progress, only the summary")
    args = parser.parse_args(argv)
    module = DEMOS[args.method]
    if args.family is None:  # the first family the installed transformers has (Qwen3-VL needs 4.57.1)
        args.family = next((name for name in module.FAMILIES if family_too_new(name) is None), module.FAMILIES[0])
    elif args.family not in module.FAMILIES:
        parser.error(
            f"--family {args.family}: the {args.method} demo runs on {', '.join(module.FAMILIES)}; choose "
            "one of those or leave --family out."
        )
    elif family_too_new(args.family):
        parser.error(
            f"--family {args.family}: needs transformers >= {family_too_new(args.family)} (found "
            f"{installed()}); choose another family or leave --family out."
        )
    if args.steps is not None and module.DEFAULT_STEPS is None:
        parser.error(
            f"--steps {args.steps}: {module.TITLE} takes no optimizer step (it is training-free); leave --steps out."
        )
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps {args.steps}: must be >= 1.")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    module = DEMOS[args.method]
    output = args.output.resolve()
    folder = output / args.method
    try:
        removed = prepare_folder(folder, module.OWN_OUTPUTS, args.overwrite)
        cli = find_cli()
    except DemoError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if removed:
        others = ", ".join(f"{name}/" for name in DEMOS if name != args.method)
        say(
            f"replaced the previous {module.TITLE} demo outputs in {folder}: {', '.join(removed)} (the folders of "
            f"the other demos, {others}, are left alone)"
        )
    mark(
        output,
        "assets*/ are the demos' cached tiny models; each of "
        + ", ".join(f"{name}/" for name in DEMOS)
        + " holds one demo's outputs",
    )
    mark(folder, f"the next {args.method} demo run replaces {', '.join(module.OWN_OUTPUTS)} here")
    ctx = DemoContext(
        output=output,
        folder=folder,
        assets=(args.assets or output / module.ASSETS_NAME).resolve(),
        family=args.family,
        steps=args.steps or module.DEFAULT_STEPS,
        cli=cli,
        env=offline_env(output / ".cache"),
        show="all" if args.verbose else "none" if args.quiet else "progress",
    )
    return module.run(ctx)
