"""A ``stage: hera`` run's preparation (phase 3, before the trainer and the model): the data checks, the contrastive
sets, ``hera_heads: auto``'s selection, the monitor's probe pairs; handed to the trainer (``hera/workflow.py``) as
:class:`HeraPreparation`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llamafactory_hera.hera.config import HeraArguments
from llamafactory_hera.hera.monitor import probe_set
from llamafactory_hera.hera.preparation_checks import (
    ContrastiveGeometry,
    checked_contrastive_geometry,
    checked_image_rows,
)
from llamafactory_hera.hera.selection.auto import resolve_auto_heads
from llamafactory_hera.hera.selection.select import scoring_dtype
from llamafactory_hera.recipe.model_paths import hub_folder
from llamafactory_hera.runtime.log import say_again_on_board
from llamafactory_hera.runtime.parsed_arguments import HostArguments
from llamafactory_hera.training import sections
from llamafactory_hera_patches.tools.model_data import RecipeArgs


@dataclass(frozen=True)
class HeraPreparation:
    """Preparation's hand-over to the trainer (``counts``, ``aligned``: None when streaming)."""

    rows: dict[str, int]
    counts: Any
    aligned: Any
    contrastive: ContrastiveGeometry
    auto: bool
    probe: Any


def prepare(hera_args: HeraArguments, parsed: HostArguments) -> HeraPreparation:
    """Before the trainer (and model): data checks, contrastive sets, ``hera_heads: auto``, probe pairs."""
    model_args, data_args, training_args, finetuning_args, _ = parsed
    say_again_on_board()  # LlamaBoard's log box lost the recipe checks' lines (a host warning)
    # data checks first: an image-less dataset is named so, not as too few pairs to select heads from
    rows, counts, aligned = checked_image_rows(model_args, data_args, finetuning_args, training_args)
    contrastive = checked_contrastive_geometry(hera_args, counts, data_args, training_args)
    auto = hera_args.auto_heads
    recipe_args = RecipeArgs(model_args, data_args, finetuning_args)
    if auto:
        precision = {
            "bf16": training_args.bf16,
            "fp16": training_args.fp16,
            "pure_bf16": finetuning_args.pure_bf16,
            "model_name_or_path": model_args.model_name_or_path,
        }
        # rank 0 scores (a first download's bytes arriving in the hub's cache are progress); the others wait in a
        # collective
        kind = "selection" if training_args.process_index == 0 else "wait"
        downloaded = hub_folder(str(model_args.model_name_or_path), model_args.cache_dir)
        with sections.section("head selection", kind, forwards=True, files=downloaded):
            hera_args.hera_heads = resolve_auto_heads(
                recipe_args,
                hera_args,
                training_args.seed,
                str(training_args.device),
                training_args.output_dir,
                training_args.process_index == 0,
                dtype=scoring_dtype(precision),
            )
    probe = probe_set(hera_args, recipe_args, aligned, training_args.seed)  # before the model loads
    return HeraPreparation(rows, counts, aligned, contrastive, auto, probe)
