"""``llamafactory_hera_run.json``: what a method's ``llamafactory-cli train`` run loaded its model with, and how it
ended. Who writes it, statuses: docs/eval.md ("What is loaded"); ``chain``: "Scored as Table 2".

A failure after the model was saved (``do_predict``, a reporting backend, an interrupt) is ``finished`` with
``error_after_save``. A run whose ranks were ended before their stage could record it (SIGKILL) is ended by its
launcher (:func:`end_unended`: torch's elastic agent, to which the stage names the record, ``agent_notes``; Ray's
driver). Imports nothing heavy.
"""

from __future__ import annotations

import json
import os
import socket
import time
import zipfile
from pathlib import Path
from typing import Any

from llamafactory_hera import __version__

RUN_RECORD = "llamafactory_hera_run.json"
COMPOSE_RECORD = "llamafactory_hera_compose.json"  # by ``llamafactory-hera compose``, beside the model
RUNNING = "running"
FINISHED = "finished"
STOPPED = "stopped"
FAILED = "failed"
CHECKPOINTS_MARKED = "checkpoints_marked"  # true: a checkpoint is whole only with its marker
PINNED_RESUME = "pinned_resume"  # a start's resume_from_checkpoint and lineage
# the keys deciding how model, processor and prompts load
MODEL_KEYS = (
    "model_name_or_path",
    "adapter_name_or_path",
    "trust_remote_code",
    "use_fast_tokenizer",
    "resize_vocab",
    "split_special_tokens",
    "add_tokens",
    "add_special_tokens",
    "image_max_pixels",
    "image_min_pixels",
    "image_do_pan_and_scan",
    "crop_to_patches",
    "video_max_pixels",
    "video_min_pixels",
    "video_fps",
    "video_maxlen",
    "use_audio_in_video",
    "audio_sampling_rate",
    "quantization_method",
    "quantization_bit",
    "quantization_type",
    "double_quantization",
)
DATA_KEYS = (
    "template",
    "dataset",
    "eval_dataset",
    "dataset_dir",
    "media_dir",
    "cutoff_len",
    "tool_format",
    "default_system",
    "enable_thinking",
    "preserve_thinking",
)
FINETUNING_KEYS = ("finetuning_type",)
TRAINING_KEYS = ("seed", "output_dir")


def plain(value: Any) -> Any:
    """``value`` as JSON holds it: tuples as lists, non-JSON scalars as text."""
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value if isinstance(value, str | int | float | bool | type(None)) else str(value)


def loading_keys(model_args: Any, data_args: Any, finetuning_args: Any, training_args: Any) -> dict[str, Any]:
    found = {}
    for holder, keys in (
        (model_args, MODEL_KEYS),
        (data_args, DATA_KEYS),
        (finetuning_args, FINETUNING_KEYS),
        (training_args, TRAINING_KEYS),
    ):
        for key in keys:
            if hasattr(holder, key):
                found[key] = plain(getattr(holder, key))
    return found


def write_started(output_dir: str | Path, stage: str, loading: dict[str, Any], marks: bool = False) -> Path:
    """Write the record with ``status: running``. ``marks``: the stage marks its checkpoints; where checkpoints are
    kept, the previous record's word and pin stand (a run begun before markers stays judged by trainer_state.json)."""
    path = Path(output_dir) / RUN_RECORD
    resumed = any(path.parent.glob("checkpoint-[0-9]*"))
    previous = read_record(path) if resumed else {}
    record = {
        "stage": stage,
        "status": RUNNING,
        "llamafactory_hera_version": __version__,
        "started_ns": time.time_ns(),
        "loading": loading,
        "chain": stage_chain(loading.get("model_name_or_path"), stage, path.parent),
        CHECKPOINTS_MARKED: bool(previous.get(CHECKPOINTS_MARKED) if resumed else marks),
        **({PINNED_RESUME: previous[PINNED_RESUME]} if PINNED_RESUME in previous else {}),
    }
    write_record(path, record)
    return path


def end_unended(path: Path, started_ns: int, error: BaseException, method_records: tuple[str, ...] = ()) -> None:
    """Mark the record at ``path`` ended by ``error`` (:func:`write_ended`, with ``method_records``) where it is a
    run's started since ``started_ns`` and still ``running``: its ranks were ended before its stage recorded the end.
    A record its rank ended, or an older run's, stays as it is."""
    record = read_record(path)
    started = record.get("started_ns")
    if record.get("status") == RUNNING and isinstance(started, int) and started >= started_ns:
        write_ended(path, error, method_records)


def stage_chain(model_name_or_path: Any, stage: str, output_dir: Path) -> list[dict[str, Any]]:
    """How the model came to be: the composed model's record, the earlier runs whose output is the next one's model,
    then this run."""
    folder = Path(str(model_name_or_path or ""))
    if folder.name.startswith("checkpoint-") and not (folder / RUN_RECORD).is_file():
        folder = folder.parent
    earlier: list[dict[str, Any]] = []
    if (folder / RUN_RECORD).is_file():
        record = read_record(folder / RUN_RECORD)
        earlier = record.get("chain") or [{"stage": record.get("stage"), "output_dir": str(folder.resolve())}]
    elif (folder / COMPOSE_RECORD).is_file():
        composed = read_record(folder / COMPOSE_RECORD)
        earlier = [{"compose": str(folder.resolve()), "llm": composed.get("llm"), "vision": composed.get("vision")}]
    return [*earlier, {"stage": stage, "output_dir": str(Path(output_dir).resolve())}]


def write_ended(path: Path, error: BaseException | None, method_records: tuple[str, ...] = ()) -> None:
    """Mark ``finished``; ``stopped`` on exit status 0 (the save signal's stop); else ``failed`` (the method's own
    records too)."""
    record = read_record(path) if path.is_file() else {}
    if not record:
        return
    if isinstance(error, SystemExit) and error.code in (0, None):
        write_record(path, {**record, "status": STOPPED})
        return
    saved = error is not None and _saved_since(path.parent, record.get("started_ns"))
    record["status"] = FINISHED if error is None or saved else FAILED
    if saved:
        record["error_after_save"] = _first_line(error)
    elif error is not None:
        record["error"] = _first_line(error)
        for name in method_records:
            other = path.parent / name
            mine = read_record(other) if other.is_file() else {}
            if mine and other.stat().st_mtime_ns >= path.stat().st_mtime_ns:  # this run's, not an older one's
                write_record(other, {**mine, "status": FAILED, "error": record["error"]})
    write_record(path, record)


def read_record(path: Path) -> dict[str, Any]:
    """The record (or any JSON object file); ``{}`` when unreadable."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # absent, torn, not UTF-8
        return {}
    return record if isinstance(record, dict) else {}


SAVED_MODEL_FILES = (
    "adapter_model.safetensors",
    "adapter_model.bin",
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def _saved_since(folder: Path, started_ns: Any) -> bool:
    """Whether a whole model was saved into ``folder`` since the run started (not a file torn by a full disk)."""
    if not isinstance(started_ns, int):
        return False
    return any(
        (folder / name).is_file()
        and (folder / name).stat().st_mtime_ns >= started_ns
        and whole_model_file(folder / name)
        for name in SAVED_MODEL_FILES
    )


def whole_model_file(path: Path) -> bool:
    if path.name.endswith(".index.json"):
        shards = read_record(path).get("weight_map")
        return (
            isinstance(shards, dict)
            and bool(shards)
            and all(whole_model_file(path.parent / str(name)) for name in set(shards.values()))
        )
    if path.suffix == ".safetensors":
        return _whole_safetensors(path)
    if path.suffix == ".bin":
        return _whole_zip(path)
    return path.is_file()


def _whole_safetensors(path: Path) -> bool:
    """Whether the file is as long as its header says."""
    try:
        with path.open("rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(min(length, path.stat().st_size)))
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
        return path.stat().st_size == 8 + length + end
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return False


def _whole_zip(path: Path) -> bool:
    """Whether the zip's central directory (at its end) reads and all members lie inside."""
    try:
        size = path.stat().st_size
        with zipfile.ZipFile(path) as archive:
            return all(member.header_offset + member.compress_size <= size for member in archive.infolist())
    except (OSError, ValueError, zipfile.BadZipFile):
        return False


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__  # Ctrl-C: KeyboardInterrupt


def write_record(path: Path, record: dict[str, Any]) -> None:
    """Write ``record`` whole at ``path``: never a torn file to read back."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")  # one per writer
    temporary.write_text(json.dumps(record, indent=2), encoding="utf-8")
    temporary.replace(path)
