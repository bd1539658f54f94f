"""A training run's ``output_dir`` before the model loads: a finished run refused or continued for more steps;
``overwrite_output_dir: true`` moves the earlier run aside. docs/hera.md ("Running again: resume, refuse, overwrite").
The host resumes from the last ``checkpoint-N`` found, finished or not, and under ``overwrite_output_dir`` writes
among the earlier run's files.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from llamafactory_hera.runtime.claim_folders import CLAIM
from llamafactory_hera.runtime.errors import RecipeError
from llamafactory_hera.runtime.log import line
from llamafactory_hera.runtime.raw_recipe import raw_value, truthy
from llamafactory_hera.runtime.run_record import FINISHED, RUN_RECORD, SAVED_MODEL_FILES, read_record
from llamafactory_hera.runtime.whole_checkpoints import CHECKPOINT_PREFIX, checkpoint_folders, newest_whole

PREVIOUS_PREFIX = "previous_run_"
END_FILES = ("trainer_state.json", "train_results.json", "all_results.json")  # written once training has ended
READ_KEYS = (
    "model_name_or_path",
    "adapter_name_or_path",
    "dataset_dir",
    "media_dir",
    "deepspeed",
    "resume_from_checkpoint",
)
# LlamaBoard's, written before the run (webui_subprocess.log: its output, read on failure)
BOARD_FILES = ("llamaboard_config.yaml", "training_args.yaml", "webui_subprocess.log")


def finished_evidence(folder: Path) -> str | None:
    """Why ``folder`` holds a finished run, or None. Its run record decides if there is one (a run killed in its final
    save left a model file and ``running``)."""
    if (folder / RUN_RECORD).is_file():
        return f"{RUN_RECORD} says finished" if read_record(folder / RUN_RECORD).get("status") == FINISHED else None
    for name in (*SAVED_MODEL_FILES, *END_FILES):
        if (folder / name).is_file():
            return f"its final {name}"
    return None


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _kept(folder: Path) -> set[Path]:
    kept = {Path(arg).resolve() for arg in sys.argv[1:] if arg.endswith((".yaml", ".yml", ".json"))}
    if os.environ.get("LLAMABOARD_WORKDIR") and Path(os.environ["LLAMABOARD_WORKDIR"]).resolve() == folder:
        kept.update(folder / name for name in BOARD_FILES)
    return kept


def _check_movable(folder: Path, host_args: Any) -> None:
    if _inside(Path.cwd().resolve(), folder):
        raise RecipeError(
            f"output_dir: {folder} holds the working folder, whose files overwrite_output_dir: true "
            "would move aside. Set an output_dir of its own (e.g. saves/RUN_NAME)."
        )
    for key in READ_KEYS:
        for value in str(raw_value(host_args, key) or "").split(","):
            if value.strip() and _inside(Path(value.strip()).expanduser().resolve(), folder):
                raise RecipeError(
                    f"{key}: {value.strip()} lies inside output_dir: {folder}, whose files "
                    "overwrite_output_dir: true moves aside before the run. Set another output_dir "
                    "(the run reads that path from there), or remove overwrite_output_dir to continue "
                    "an unfinished run in its folder."
                )


def movable_entries(folder: Path) -> list[Path]:
    """What an overwrite moves: all but earlier ``previous_run_*`` folders and this run's own files."""
    kept = _kept(folder)
    return sorted(
        p for p in folder.iterdir() if not p.name.startswith((PREVIOUS_PREFIX, CLAIM)) and p.resolve() not in kept
    )


def move_aside(folder: Path, entries: list[Path]) -> Path | None:
    """Move ``entries`` into a new ``previous_run_<time>/``; None when none was left (another rank's LlamaBoard
    callback deletes ``running_log.txt``)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = folder / f"{PREVIOUS_PREFIX}{stamp}"
    number = 1
    while target.exists():
        number += 1
        target = folder / f"{PREVIOUS_PREFIX}{stamp}_{number}"
    target.mkdir()
    moved = []
    for entry in entries:
        try:
            entry.rename(target / entry.name)
        except FileNotFoundError:
            continue
        moved.append(entry)
    if not moved:
        target.rmdir()
        return None
    names = ", ".join(entry.name for entry in moved[:8]) + (f" and {len(moved) - 8} more" if len(moved) > 8 else "")
    print(
        line(
            f"overwrite_output_dir: moved the earlier run's files out of {folder} into {target.name}/ ({names}); "
            "delete that folder when you no longer need it."
        ),
        flush=True,
    )
    return target


def _number(value: Any, default: float) -> float:
    try:
        return float(value) if value is not None and str(value).strip() != "" else default
    except ValueError:
        return default


def _asks_more(host_args: Any, state: dict[str, Any]) -> bool:
    """Whether the recipe asks for more steps, or without ``max_steps`` more epochs, than the finished run took."""
    max_steps = _number(raw_value(host_args, "max_steps"), -1)
    if max_steps > 0:
        return max_steps > _number(state.get("global_step"), 0)
    return _number(raw_value(host_args, "num_train_epochs"), 3.0) > _number(state.get("epoch"), 0) + 1e-6


def continues_finished(folder: Path, host_args: Any) -> bool:
    """Whether the recipe trains the finished run on from its last checkpoint, asking for more."""
    state = read_record(folder / "trainer_state.json")
    checkpoints = checkpoint_folders(folder)
    if not state or not checkpoints:
        return False
    resume = raw_value(host_args, "resume_from_checkpoint")
    if resume is False or str(resume).strip().lower() in {"", "false"}:
        return False  # the Trainer would start from step 0 over the finished model
    if resume not in (None, True) and Path(str(resume)).expanduser().resolve() != checkpoints[-1]:
        return False  # true: the last checkpoint, as LLaMA-Factory picks it without the key
    return _asks_more(host_args, state)


def _how_to_continue(folder: Path, resume: Any) -> str:
    state = read_record(folder / "trainer_state.json")
    checkpoints = checkpoint_folders(folder)
    if not state or not checkpoints:
        return ""
    steps = state.get("global_step")
    epochs = round(_number(state.get("epoch"), 0), 4)
    unset = " and leave resume_from_checkpoint unset" if resume else ""
    return (
        f" To continue it here from its last checkpoint ({checkpoints[-1].name}), ask for more than it took: "
        f"max_steps above {steps}, or without max_steps num_train_epochs above {epochs:g}{unset}."
    )


def refuse_finished(host_args: Any) -> None:
    """Before the parse, any stage: refuse training into a finished run's folder without ``overwrite_output_dir``
    unless it asks for more; else the host would train a step past ``max_steps`` and write over the finished model."""
    if (
        not truthy(raw_value(host_args, "do_train"))
        or not raw_value(host_args, "output_dir")
        or truthy(raw_value(host_args, "overwrite_output_dir"))
    ):
        return
    folder = Path(str(raw_value(host_args, "output_dir"))).expanduser().resolve()
    evidence = finished_evidence(folder) if folder.is_dir() else None
    if evidence is not None and not continues_finished(folder, host_args):
        given = raw_value(host_args, "resume_from_checkpoint")
        newest = newest_whole(folder)[0]
        resume = given if given and given is not True else newest or f"{folder}/{CHECKPOINT_PREFIX}N"
        raise RecipeError(
            f"output_dir: {folder} holds a finished run ({evidence}); training again would resume it "
            "or write over its model. Set another output_dir for a new run, or overwrite_output_dir: "
            f"true to move that run's files into {folder}/{PREVIOUS_PREFIX}<time>/ and train afresh. "
            f"To train that run further, set another output_dir and resume_from_checkpoint: {resume} "
            f"(one of its checkpoints).{_how_to_continue(folder, given)}"
        )


def moves_here(training_args: Any) -> bool:
    """Whether this process moves the files: under ``save_on_each_node`` each node's main process, else the global
    one."""
    if getattr(training_args, "save_on_each_node", False):
        return getattr(training_args, "local_process_index", 0) == 0
    return getattr(training_args, "process_index", 0) == 0


def _wait_for_the_move() -> None:
    # lazy: the checks before the parse run without torch
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def clear_for_overwrite(host_args: Any, training_args: Any) -> None:
    """After the parse and checks: under ``overwrite_output_dir: true`` move an earlier run aside. Every rank checks it
    may (a refusal ends all alike); :func:`moves_here` moves; all wait for it."""
    if not (
        getattr(training_args, "do_train", False)
        and getattr(training_args, "overwrite_output_dir", False)
        and getattr(training_args, "output_dir", None)
    ):
        return
    folder = Path(training_args.output_dir).expanduser().resolve()
    entries = movable_entries(folder) if folder.is_dir() else []
    if entries:
        _check_movable(folder, host_args)
        if moves_here(training_args):
            move_aside(folder, entries)
    _wait_for_the_move()
