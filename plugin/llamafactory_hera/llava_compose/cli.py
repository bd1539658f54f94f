"""The ``compose`` verb: ``llamafactory-hera compose --llm LLM [--vision VISION] --output DIR``."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llamafactory_hera.llava_compose.plan import DEFAULT_VISION


def add_verbs(commands: Any) -> dict[str, Callable[[argparse.Namespace], None]]:
    """Add ``compose`` to ``commands`` (argparse subparsers); return its handler."""
    parser = commands.add_parser(
        "compose", help="a LLaVA-1.5-style model from a text-only LLM and an image encoder",
        description="Write a LLaVA checkpoint (transformers' LlavaForConditionalGeneration) of the LLM's and the "
        "vision tower's weights and a fresh seeded 2-layer MLP projector, its processor, and "
        "llamafactory_hera_compose.json; print the template: line to train it with.")
    parser.add_argument("--llm", required=True, help="a text-only LLM: Hub id or local folder")
    parser.add_argument("--vision", default=DEFAULT_VISION,
                        help=f"a CLIP or SigLIP image encoder: Hub id or local folder (default {DEFAULT_VISION})")
    parser.add_argument("--output", required=True, type=Path, help="a new (or empty) folder for the checkpoint")
    parser.add_argument("--family", default=None,
                        help="the LLM's conversation format, instead of the one read from its config and tokenizer")
    parser.add_argument("--seed", type=int, default=42, help="seed of the projector's initialisation (default 42)")
    return {"compose": run}


def run(args: argparse.Namespace) -> None:
    """Plan (refusing before any weight loads), build, write; print what was made and the template line."""
    from llamafactory_hera.llava_compose.build import RECORD, compose
    from llamafactory_hera.llava_compose.plan import plan_compose

    plan, tokenizer = plan_compose(args.llm, args.vision, args.output, args.family, args.seed)
    record = compose(plan, tokenizer)
    strategy = {"default": "its [CLS] dropped", "full": "every patch token (no [CLS])"}[plan.geometry.select_strategy]
    print(f"composed {record['architecture']} in {plan.output}")
    print(f"  llm:       {plan.llm} (family {plan.family}: {plan.family_reason})")
    print(f"  vision:    {plan.vision} ({plan.geometry.encoder}, layer {plan.geometry.feature_layer}, {strategy}: "
          f"{plan.geometry.image_seq_length} image tokens per image)")
    print(f"  projector: {record['projector']}; {record['projector_init']}, seed {plan.seed}")
    print(f"  tokenizer: {record['added_token']}")
    print(f"  dtype:     {record['dtype']} (vision tower: {record['vision_dtype']})")
    print(f"  record:    {plan.output / RECORD}")
    print(f"template: {plan.template}")
