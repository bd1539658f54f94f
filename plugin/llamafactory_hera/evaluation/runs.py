"""What ``llamafactory-hera eval`` evaluates: a run directory read back into the recipe that loads it (docs/eval.md,
"What is loaded"). Light imports."""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llamafactory_hera.recipe.dataset_info import as_names
from llamafactory_hera.recipe.model_paths import check_model_paths
from llamafactory_hera.runtime.errors import RecipeError
from llamafactory_hera.runtime.run_record import FINISHED, RUN_RECORD, read_record

LLAMABOARD_ARGS = "training_args.yaml"
HERA_RECORD = "hera_run.json"
RAH_RECORD = "rah_profile.json"
HARC_RECORD = "harc_run.json"
# how model, processor and prompts are read: must match between run and baseline
COMPARED = (
    "template",
    "cutoff_len",
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
    "use_fast_tokenizer",
    "resize_vocab",
    "split_special_tokens",
    "add_tokens",
    "add_special_tokens",
    "tool_format",
    "default_system",
    "enable_thinking",
    "preserve_thinking",
)
# quantization too: a QLoRA run is evaluated on its 4-bit base (the report says the precision)
LOADING_KEYS = (
    "model_name_or_path",
    "adapter_name_or_path",
    "finetuning_type",
    "trust_remote_code",
    "dataset_dir",
    "media_dir",
    "quantization_method",
    "quantization_bit",
    "quantization_type",
    "double_quantization",
    *COMPARED,
)
RECORDS = f"{RUN_RECORD}, {LLAMABOARD_ARGS}, {HERA_RECORD}, {RAH_RECORD} or {HARC_RECORD}"
DEFAULT_SEED = 42  # LLaMA-Factory's default: a run that recorded none trained with it


@dataclass
class ModelSpec:
    label: str  # "run" / "baseline"
    run_dir: Path
    stage: str  # hera / rah / harc / sft
    recipe: dict[str, Any]  # LLaMA-Factory keys
    modality: str  # "mllm" / "text"
    trained: bool  # False: --base
    harc: dict[str, Any] = field(default_factory=dict)  # a HARC run's harc_* keys (refusal task)
    seed: int = DEFAULT_SEED
    inherited: dict[str, Any] = field(default_factory=dict)  # COMPARED keys taken over from the other model

    @property
    def title(self) -> str:
        return f"{self.run_dir.name}{'' if self.trained else ' (base)'}"

    def cache_key(self) -> str:
        """Identifies the weights: loading keys and each adapter / model file's size and time."""
        stamp = []
        for key in ("model_name_or_path", "adapter_name_or_path"):
            for path in str(self.recipe.get(key) or "").split(","):
                folder = Path(path.strip())
                for name in ("adapter_model.safetensors", "adapter_model.bin", "model.safetensors", "config.json"):
                    if (folder / name).is_file():
                        stat = (folder / name).stat()
                        stamp.append(f"{folder / name}:{stat.st_size}:{stat.st_mtime_ns}")
        text = json.dumps({"recipe": self.recipe, "files": stamp}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise RecipeError(f"RUN_DIR: cannot read {path}: {err}; re-run training to rewrite it") from err


def _seed(value: Any) -> int:
    return DEFAULT_SEED if value is None else int(value)


def _finished(run_dir: Path, name: str, record: dict[str, Any]) -> dict[str, Any]:
    status = record.get("status")
    if record.get("error_after_save"):
        print(
            f"note: {run_dir / name}: the run saved its model, then failed ({record['error_after_save']}); "
            "evaluating the saved model",
            file=sys.stderr,
        )
    if status is not None and status != FINISHED:
        why = (
            f": {record['error']}"
            if record.get("error")
            else {
                "running": " (killed, or still training)",
                "stopped": " (stopped by its save signal: the same training command continues it)",
            }.get(status, "")
        )
        raise RecipeError(
            f"RUN_DIR: {run_dir / name} says status: {status}{why}; that run did not finish, so its "
            "folder holds no model to evaluate. Re-run training into it (or give a finished run)"
        )
    return record


def _method_keys(run_dir: Path) -> dict[str, Any]:
    if (run_dir / HARC_RECORD).is_file():
        return _finished(run_dir, HARC_RECORD, _read_json(run_dir / HARC_RECORD)).get("settings") or {}
    board = run_dir / LLAMABOARD_ARGS
    if board.is_file():
        return {
            k: v for k, v in (yaml.safe_load(board.read_text(encoding="utf-8")) or {}).items() if k.startswith("harc_")
        }
    return {}


def _recorded_recipe(run_dir: Path) -> tuple[str, dict[str, Any], dict[str, Any], int, Path]:
    """A record-less ``checkpoint-N`` takes its run's (else the baseline's loading keys, the confound the records
    exist to catch)."""
    own = (RUN_RECORD, LLAMABOARD_ARGS, HERA_RECORD, RAH_RECORD, HARC_RECORD)
    if (
        run_dir.name.startswith("checkpoint-")
        and not any((run_dir / name).is_file() for name in own)
        and (run_dir.parent / RUN_RECORD).is_file()
    ):
        return _recorded_recipe(run_dir.parent)
    if (run_dir / RUN_RECORD).is_file():
        record = _finished(run_dir, RUN_RECORD, read_record(run_dir / RUN_RECORD))
        loading = record.get("loading") or {}
        if loading:
            stage = str(record.get("stage") or "sft")
            return (
                stage,
                loading,
                _method_keys(run_dir) if stage == "harc" else {},
                _seed(loading.get("seed")),
                run_dir / RUN_RECORD,
            )
    board = run_dir / LLAMABOARD_ARGS
    if board.is_file():
        recipe = yaml.safe_load(board.read_text(encoding="utf-8")) or {}
        stage = str(recipe.get("stage", "sft"))
        method = {k: v for k, v in recipe.items() if k.startswith("harc_")}
        return stage, recipe, method, _seed(recipe.get("seed")), board
    if (run_dir / HERA_RECORD).is_file():
        record = _finished(run_dir, HERA_RECORD, _read_json(run_dir / HERA_RECORD))
        host = record.get("host") or {}
        if not host:
            raise RecipeError(f"RUN_DIR: {run_dir / HERA_RECORD} has no 'host' section (an older run); re-run training")
        return "hera", host, {}, _seed(host.get("seed")), run_dir / HERA_RECORD
    if (run_dir / RAH_RECORD).is_file():
        identity = _finished(run_dir, RAH_RECORD, _read_json(run_dir / RAH_RECORD)).get("identity") or {}
        return "rah", {**identity, "finetuning_type": "lora"}, {}, _seed(identity.get("seed")), run_dir / RAH_RECORD
    if (run_dir / HARC_RECORD).is_file():
        record = _finished(run_dir, HARC_RECORD, _read_json(run_dir / HARC_RECORD))
        host = record.get("host") or {}
        return "harc", host, record.get("settings") or {}, _seed(host.get("seed")), run_dir / HARC_RECORD
    adapter_config = run_dir / "adapter_config.json"
    if adapter_config.is_file():  # plain llamafactory-cli LoRA: PEFT records the base
        base = _read_json(adapter_config).get("base_model_name_or_path")
        if base:
            return "sft", {"model_name_or_path": base, "finetuning_type": "lora"}, {}, DEFAULT_SEED, adapter_config
    if (run_dir / "config.json").is_file():  # plain full / freeze: base unknown
        return (
            "sft",
            {"model_name_or_path": str(run_dir), "finetuning_type": "full", "_no_base": True},
            {},
            DEFAULT_SEED,
            run_dir / "config.json",
        )
    raise FileNotFoundError(
        f"RUN_DIR: {run_dir} holds no run record ({RECORDS}) and no LoRA adapter naming its base "
        "model; give the output_dir of a finished llamafactory-cli train or LlamaBoard run"
    )


def is_multimodal(model_name_or_path: str, template: str | None = None) -> bool:
    config = Path(model_name_or_path) / "config.json"
    if config.is_file():
        data = _read_json(config)
        if any(key in data for key in ("vision_config", "vision_tower", "mm_vision_tower", "visual")):
            return True
    if template:
        # lazy: the host's templates, only for a template given
        from llamafactory_hera_patches.data.templates import template_tokens

        found = template_tokens().get(template)
        return bool(found and found.multimodal)
    return False


def read_run(run_dir: Path, label: str, trained: bool, template: str | None = None, base: bool = False) -> ModelSpec:
    """``template`` fills in one the run did not record; ``base``: the run will be compared with its base."""
    if not run_dir.is_dir():
        raise FileNotFoundError(f"RUN_DIR: {run_dir} is not a folder; give a run's output_dir")
    stage, host, method, seed, record = _recorded_recipe(run_dir)
    if host.get("_no_base") and not trained:
        raise RecipeError(
            f"--base: {run_dir} is a full fine-tuning run without a run record, so its base model is "
            "unknown; give the base as a run with --baseline, or evaluate the run alone"
        )
    recipe = {k: host[k] for k in LOADING_KEYS if host.get(k) is not None}
    inherited = {}
    if template and not recipe.get("template"):
        recipe["template"] = inherited["template"] = template
    if not recipe.get("model_name_or_path"):
        raise RecipeError(f"RUN_DIR: the record of {run_dir} names no model_name_or_path; re-run training with it set")
    if not recipe.get("template"):
        raise RecipeError(
            f"RUN_DIR: {run_dir} records no template (a {stage} run of llamafactory-cli keeps none); "
            "pass --template with the recipe's template: value, e.g. --template qwen2_vl"
        )
    base_path = str(recipe["model_name_or_path"])
    adapters = as_names(recipe.get("adapter_name_or_path"))
    if trained:
        if (run_dir / "adapter_config.json").is_file():
            # a later do_predict into its own folder names the run as an adapter already
            adapters = [a for a in adapters if Path(a).resolve() != run_dir.resolve()] + [str(run_dir)]
            recipe["finetuning_type"] = "lora"
        elif (run_dir / "config.json").is_file():
            recipe["model_name_or_path"] = str(run_dir)
            adapters = []
        else:
            against = ", nor to compare with its base (--base)" if base else ""
            raise FileNotFoundError(
                f"RUN_DIR: {run_dir} has neither adapter_config.json nor config.json (did "
                f"training finish?): it holds no trained model to evaluate{against}. Give the "
                "output_dir of a finished run, or finish this one (resume_from_checkpoint: one of "
                "its checkpoints)"
            )
    if adapters:
        recipe["adapter_name_or_path"] = ",".join(adapters)
    else:
        recipe.pop("adapter_name_or_path", None)
    # check the folders now (a moved base fails at loading once per task, leaving a report of failures); before
    # is_multimodal, which may read LLaMA-Factory's templates
    flag = "RUN_DIR" if label == "run" else "--baseline" if trained else "--base"
    check_model_paths(
        recipe,
        started="llamafactory-hera eval",
        where=f"{flag}: {record}: ",
        fix=f"Restore that folder, or correct the path in {record.name}.",
    )
    modality = "mllm" if stage in ("hera", "rah") or is_multimodal(base_path, recipe["template"]) else "text"
    return ModelSpec(label, run_dir, stage, recipe, modality, trained, method, seed, inherited)


def align_loading(run: ModelSpec, other: ModelSpec, flag: str) -> None:
    """Refuse a :data:`COMPARED` key both recorded differently; one only one recorded goes to the other's
    ``inherited``."""
    for key in COMPARED:
        mine = run.recipe.get(key)
        theirs = other.recipe.get(key)
        if mine is not None and theirs is not None and _comparable(key, mine) != _comparable(key, theirs):
            raise RecipeError(
                f"{flag}: {other.run_dir} loads with {key}: {theirs!r} but {run.run_dir} with {key}: "
                f"{mine!r} (as each was trained); every delta would mix in that difference. Compare "
                f"runs trained with the same {key} (re-train one with {key}: {mine!r})"
            )
        if mine is None and theirs is not None:
            run.recipe[key] = run.inherited[key] = theirs
        elif theirs is None and mine is not None:
            other.recipe[key] = other.inherited[key] = mine


def _comparable(key: str, value: Any) -> Any:
    """Token lists are lists in a run record, ``"a,b"`` in LlamaBoard's args."""
    return as_names(value) if key in ("add_tokens", "add_special_tokens") else value


def read_pair(
    run_dir: Path, baseline: Path | None, base: bool, template: str | None = None
) -> tuple[ModelSpec, ModelSpec | None]:
    """The run and its baseline, loaded alike; a ``template`` the run contradicts is refused (not ignored)."""
    run = read_run(run_dir, "run", trained=True, template=template, base=base)
    if template is not None and "template" not in run.inherited and run.recipe["template"] != template:
        raise RecipeError(
            f"--template {template}: {run_dir} records template: {run.recipe['template']}, the template "
            "it was trained with and is evaluated with; --template only fills in a template a run did "
            f"not record. Leave --template out, or evaluate a run trained with template: {template}"
        )
    if baseline is not None:
        other = read_run(baseline, "baseline", trained=True, template=template or run.recipe["template"])
        if other.stage == "sft" and other.modality != run.modality:  # a record-less twin
            other.modality = run.modality
        if other.modality != run.modality:
            raise RecipeError(
                f"--baseline: {baseline} holds a {other.modality} model but {run_dir} a {run.modality} "
                "model; compare runs of the same model family"
            )
        align_loading(run, other, "--baseline")
        return run, other
    if base:
        return run, read_run(run_dir, "baseline", trained=False, template=template)
    return run, None
