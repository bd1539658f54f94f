"""The checkpoint a plugin stage resumes from, checked before the parse: the host would fail on a mismatch only after
the model loads, or silently resume a finished run's folder (no optimizer state). Which one: docs/hera.md ("Killed,
preempted, disk full"). It must be a Trainer checkpoint of the run the recipe asks for (LoRA rank and DoRA, or full or
freeze), of the same architecture and sizes, by the same stage. Only small files are read; what they do not say is
not checked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamafactory_hera.runtime.claim_folders import CLAIM, made_by_claim
from llamafactory_hera.runtime.errors import RecipeError
from llamafactory_hera.runtime.log import say
from llamafactory_hera.runtime.raw_recipe import given_keys, truthy
from llamafactory_hera.runtime.run_record import RUN_RECORD, SAVED_MODEL_FILES, read_record
from llamafactory_hera.runtime.shared_output import PROBE_PREFIX
from llamafactory_hera.runtime.whole_checkpoints import MARKER, newest_since, newest_whole, whole_checkpoints
from llamafactory_hera_patches.recipe.host_arguments import host_keys

# what a job writes into output_dir before its run starts: its claim, and the heartbeat folder an older plugin's
# watchdog left when killed
WATCHDOG_FOLDER = "llamafactory_hera_watchdog"
JOB_FILES = (CLAIM, WATCHDOG_FOLDER)

CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")  # transformers' PREFIX_CHECKPOINT_DIR and get_last_checkpoint
TRAINER_STATE = "trainer_state.json"
ADAPTER_CONFIG = "adapter_config.json"
MODEL_CONFIG = "config.json"
WHOLE_MODEL_FILES = tuple(name for name in SAVED_MODEL_FILES if not name.startswith("adapter_"))
# never in a checkpoint: the run record, the end-of-run results (LLaMA-Factory's save_metrics)
RUN_FOLDER_FILES = (RUN_RECORD, "train_results.json", "all_results.json")
# sizes that set every weight's shape (not vocab_size: resize_vocab and added tokens change it)
SIZE_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "depth",
    "embed_dim",
    "num_heads",
    "patch_size",
    "temporal_patch_size",
    "spatial_merge_size",
    "out_hidden_size",
    "image_size",
    "projection_dim",
    "hidden_dim",
    "num_layers",
)
_SHOWN = 3


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint folder as its small files say."""

    folder: Path
    kind: str | None  # "lora" / "oft" (PEFT type), "whole" (full or freeze), None: unknown
    finetuning_type: str | None  # from its run's record
    stage: str | None  # from its run's record
    rank: int | None
    dora: bool | None
    config: dict[str, Any] | None  # config.json (LoRA: the base model's)
    model: str  # its name in messages: class, else path
    source: str | None  # the model_name_or_path it was trained from

    def described(self) -> str:
        if self.kind in ("lora", "oft"):
            what = f"{self.kind.upper() if self.kind == 'oft' else 'LoRA'}" + (
                f" (rank {self.rank}{', DoRA' if self.dora else ''})" if self.rank is not None else ""
            )
        else:
            what = self.finetuning_type or "full or freeze"
        stage = f"stage: {self.stage} " if self.stage else ""
        return f"a {stage}{what} checkpoint of {self.model}"


def last_checkpoint(folder: Path) -> Path | None:
    return newest_whole(folder)[0]


def model_config(source: Any) -> dict[str, Any] | None:
    """A model's ``config.json`` (local folder, or hub id in the local cache), else None."""
    if not source:
        return None
    folder = Path(str(source)).expanduser()
    if folder.is_dir():
        return read_record(folder / MODEL_CONFIG) or None
    # lazy: only a hub id needs huggingface_hub
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(str(source), MODEL_CONFIG)
    except ValueError:  # not a hub id either
        return None
    return (read_record(Path(cached)) or None) if isinstance(cached, str) else None


def architecture(config: dict[str, Any] | None, fallback: Any) -> str:
    names = (config or {}).get("architectures") or []
    return str(names[0] if names else (config or {}).get("model_type") or fallback)


def sizes(config: dict[str, Any]) -> dict[str, Any]:
    """:data:`SIZE_KEYS` at the top and one sub-config level down (``text_config.hidden_size``)."""
    found = {key: config[key] for key in SIZE_KEYS if key in config}
    for name, sub in config.items():
        if isinstance(sub, dict):
            found.update({f"{name}.{key}": sub[key] for key in SIZE_KEYS if key in sub})
    return found


def read_checkpoint(folder: Path) -> Checkpoint:
    """A checkpoint's adapter config or weights, and its run's record (a ``checkpoint-N``'s parent's, else its own)."""
    record_folder = folder.parent if CHECKPOINT_NAME.match(folder.name) else folder
    record = read_record(record_folder / RUN_RECORD)
    loading = record.get("loading") if isinstance(record.get("loading"), dict) else {}
    adapter = read_record(folder / ADAPTER_CONFIG)
    if adapter:
        base = adapter.get("base_model_name_or_path") or loading.get("model_name_or_path")
        config = model_config(base) or model_config(loading.get("model_name_or_path"))
        rank = adapter.get("r")
        return Checkpoint(
            folder,
            str(adapter.get("peft_type", "lora")).lower(),
            loading.get("finetuning_type"),
            record.get("stage"),
            rank if isinstance(rank, int) else None,
            bool(adapter.get("use_dora")),
            config,
            architecture(config, base),
            base,
        )
    whole = (folder / MODEL_CONFIG).is_file() or any((folder / name).is_file() for name in WHOLE_MODEL_FILES)
    config = (read_record(folder / MODEL_CONFIG) or None) if whole else None
    finetuning = loading.get("finetuning_type")
    return Checkpoint(
        folder,
        "whole" if whole else None,
        finetuning if finetuning in ("full", "freeze") else None,
        record.get("stage"),
        None,
        None,
        config,
        architecture(config, "an unknown model"),
        loading.get("model_name_or_path"),
    )


def _value(given: dict[str, Any], key: str) -> Any:
    value = given.get(key)
    if value is None or (isinstance(value, str) and value.strip().lower() in {"", "none", "null"}):
        return host_keys()[key].default if key in host_keys() else None
    return value


def _differences(
    held: Checkpoint, stage: str, given: dict[str, Any], wanted_config: dict[str, Any] | None
) -> tuple[list[str], list[str]]:
    finetuning = str(_value(given, "finetuning_type")).strip().lower()
    differ: list[str] = []
    matching: list[str] = []
    adapter = held.kind in ("lora", "oft")
    if (held.kind is not None and adapter != (finetuning in ("lora", "oft"))) or (adapter and held.kind != finetuning):
        matching.append(f"finetuning_type: {held.kind if adapter else held.finetuning_type or 'full or freeze'}")
    elif (
        held.finetuning_type in ("full", "freeze")
        and finetuning in ("full", "freeze")
        and held.finetuning_type != finetuning
    ):
        matching.append(f"finetuning_type: {held.finetuning_type}")
    elif adapter and held.rank is not None and str(held.rank) != str(_value(given, "lora_rank")).strip():
        matching.append(f"lora_rank: {held.rank}")
    elif adapter and held.dora is not None and held.dora != truthy(_value(given, "use_dora")):
        matching.append(f"use_dora: {str(held.dora).lower()}")
    if held.config is not None and wanted_config is not None:
        # by model_type: a loader's class may differ from the config's
        if (held.config.get("model_type") or architecture(held.config, "")) != (
            wanted_config.get("model_type") or architecture(wanted_config, "")
        ):
            differ.append("another architecture")
        else:
            theirs = sizes(held.config)
            ours = sizes(wanted_config)
            changed = [key for key in theirs if key in ours and theirs[key] != ours[key]]
            if changed:
                differ.append(
                    "other sizes: "
                    + ", ".join(f"{key} {theirs[key]} there, {ours[key]} here" for key in changed[:_SHOWN])
                )
        if differ:
            matching.append(f"model_name_or_path: {held.source or f'a {held.model} of its sizes'}")
    if held.stage and held.stage != stage:
        matching.append(f"stage: {held.stage}")
    return differ, matching


def _wanted(stage: str, given: dict[str, Any], config: dict[str, Any] | None) -> str:
    finetuning = str(_value(given, "finetuning_type")).strip().lower()
    rank = f" (lora_rank: {_value(given, 'lora_rank')})" if finetuning in ("lora", "oft") else ""
    model = architecture(config, _value(given, "model_name_or_path"))
    return f"stage: {stage}, finetuning_type: {finetuning}{rank} of {model}"


def check_checkpoint(stage: str, given: dict[str, Any], folder: Path, named: str, afresh: str) -> None:
    """``folder`` is a checkpoint of the run ``given`` asks for; a refusal starts with ``named`` (the key leading
    there), ends with ``afresh`` (how to train without it)."""
    afresh = afresh[0].lower() + afresh[1:]
    fix = f"Name a checkpoint of an earlier run (its OUTPUT_DIR/checkpoint-N), or {afresh}."
    if not (folder / TRAINER_STATE).is_file():
        raise RecipeError(f"{named} is not a Trainer checkpoint (it has no {TRAINER_STATE}). {fix}")
    held = read_checkpoint(folder)
    if held.kind is None and not any(entry.name.startswith("global_step") for entry in folder.iterdir()):
        raise RecipeError(
            f"{named} holds no model weights (no {ADAPTER_CONFIG}, no {', '.join(WHOLE_MODEL_FILES)}). {fix}"
        )
    wanted_config = model_config(_value(given, "model_name_or_path"))
    differ, matching = _differences(held, stage, given, wanted_config)
    if not matching:
        return
    how = f" ({'; '.join(differ)})" if differ else ""
    start = ("adapter_name_or_path" if held.kind in ("lora", "oft") else "model_name_or_path") + f": {folder}"
    raise RecipeError(
        f"{named} is {held.described()}; this recipe trains {_wanted(stage, given, wanted_config)}"
        f"{how}. Resume it with the settings of the run that wrote it ({', '.join(matching)}), or "
        f"{afresh} (a new run can start from its weights: {start})."
    )


def _run_folder(folder: Path) -> bool:
    return not CHECKPOINT_NAME.match(folder.name) and (
        any((folder / name).is_file() for name in RUN_FOLDER_FILES) or last_checkpoint(folder) is not None
    )


def _job_file(name: str) -> bool:
    """Whether a job writes ``name`` into output_dir before its run starts (a probe a failed start left too)."""
    return name in JOB_FILES or name.startswith(PROBE_PREFIX)


def check_resume(stage: str, host_args: dict[str, Any] | list[str]) -> None:
    """The checkpoint the recipe resumes from, if any, fits it (module doc); after the model paths' check."""
    given = given_keys(host_args)
    value = given.get("resume_from_checkpoint")
    output_dir = given.get("output_dir")
    overwrite = truthy(given.get("overwrite_output_dir", False))
    afresh = "Remove resume_from_checkpoint to train afresh"
    if value is None:  # LLaMA-Factory resumes an output_dir's last checkpoint by itself
        out = Path(str(output_dir)).expanduser() if output_dir else None
        last = (
            last_checkpoint(out) if out is not None and truthy(given.get("do_train", False)) and not overwrite else None
        )
        if last is not None:
            check_checkpoint(
                stage,
                given,
                last,
                f"output_dir: {output_dir} holds an unfinished run, which "
                f"LLaMA-Factory resumes from its last checkpoint; {last}",
                "Set overwrite_output_dir: true to train afresh (its files move aside), or another output_dir",
            )
        return
    if value is False or (isinstance(value, str) and not value.strip()):  # no resume (the Trainer's False)
        return
    if value is True:  # a YAML true (a string "true" is a path to the Trainer, as here)
        out = Path(str(output_dir)).expanduser() if output_dir else None
        if overwrite:
            raise RecipeError(
                f"resume_from_checkpoint: true resumes the last checkpoint of output_dir: {output_dir}, "
                "but overwrite_output_dir: true moves that folder's files aside first. Remove one of "
                "them: resume_from_checkpoint to train afresh, overwrite_output_dir to resume."
            )
        last = last_checkpoint(out) if out is not None else None
        if last is None:
            # this run's claim (before the checks) may have made the folder: to the user it did not exist
            held = out is not None and out.is_dir() and not made_by_claim(out)
            if held and read_record(out / RUN_RECORD).get("stage") == stage:  # stopped before its first checkpoint
                say(
                    f"resume_from_checkpoint: true: output_dir: {output_dir} holds no whole checkpoint of its run yet "
                    "(stopped before one): starting the run, reusing what its passes before step 1 kept."
                )
                return
            if not held or all(_job_file(entry.name) for entry in out.iterdir()):  # a job's first start
                say(
                    f"resume_from_checkpoint: true: output_dir: {output_dir} holds no run yet: starting it (the same "
                    "command resumes it from its newest whole checkpoint)."
                )
                return
            half = [path.name for path in newest_whole(out)[1]] if held else []  # a run killed in its first save
            where = (
                f"whose checkpoints ({', '.join(half)}) are all half-written (saves that did not finish on every rank)"
                if half
                else "which holds no checkpoint-N folder and no run record of this stage"
            )
            raise RecipeError(
                f"resume_from_checkpoint: true resumes the last checkpoint of output_dir: {output_dir}, "
                f"{where}: there is nothing to resume. {afresh}, or name a checkpoint of an earlier "
                "run (its OUTPUT_DIR/checkpoint-N)."
            )
        check_checkpoint(
            stage, given, last, f"resume_from_checkpoint: true (the last checkpoint of output_dir) {last}", afresh
        )
        return
    folder = Path(str(value)).expanduser()
    since = newest_since(Path(str(output_dir)).expanduser(), value) if output_dir else None
    if since is not None:  # an earlier start took the pin: the trainer resumes from this one, and says so
        check_checkpoint(
            stage, given, since, f"resume_from_checkpoint: {value} (the checkpoint saved since) {since}", afresh
        )
        return
    fix = (
        "Name a checkpoint folder of an earlier run (OUTPUT_DIR/checkpoint-N), or remove resume_from_checkpoint "
        "(a run whose output_dir holds checkpoints resumes from the last one unless overwrite_output_dir: true)."
    )
    if not folder.is_dir():
        raise RecipeError(f"resume_from_checkpoint: {value} is not a folder. {fix}")
    if CHECKPOINT_NAME.match(folder.name) and folder not in whole_checkpoints(folder.parent):
        newest = last_checkpoint(folder.parent)
        way = f"resume_from_checkpoint: {newest}" if newest else "none is: remove resume_from_checkpoint (afresh)"
        raise RecipeError(
            f"resume_from_checkpoint: {value} is half-written (a save that did not finish on every rank: "
            f"no {MARKER}). Resume from the newest whole checkpoint of its run, {way}."
        )
    if _run_folder(folder):
        last = last_checkpoint(folder)
        named = (
            f"resume_from_checkpoint: {last} (its last checkpoint) to train that run further"
            if last
            else "one of its checkpoint-N folders (it has none: save_strategy was no, or they were deleted)"
        )
        start = "adapter_name_or_path" if (folder / ADAPTER_CONFIG).is_file() else "model_name_or_path"
        raise RecipeError(
            f"resume_from_checkpoint: {value} is a run's output folder, not a checkpoint: resuming "
            "from it restores no optimizer state and trains on from that run's end (no step when it "
            f"reached max_steps). Name {named}, or, for a new run from its final model, set {start}: "
            f"{value} and remove resume_from_checkpoint."
        )
    check_checkpoint(stage, given, folder, f"resume_from_checkpoint: {value}", afresh)
