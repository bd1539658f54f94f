"""The checks every plugin stage runs after LLaMA-Factory's parse, before any model or dataset loads
(:func:`check_run_inputs`), each one line naming the key, the value and the fix. Before the parse: :mod:`.raw_checks`.
"""

from __future__ import annotations

import difflib
import tempfile
from pathlib import Path
from typing import Any

from llamafactory_hera.recipe.dataset_info import DATA_CONFIG, as_names, dataset_info
from llamafactory_hera.recipe.fsdp import check_fsdp_parsed
from llamafactory_hera.runtime.errors import RecipeError
from llamafactory_hera_patches.data.templates import template_tokens

NOT_LOCAL = ("REMOTE:", "ONLINE")  # LLaMA-Factory's dataset_dir values that are not a folder


_EMPTY_TEXTS = ("", "[]", "{}")  # a JSON / JSONL dataset file with no row


# LLaMA-Factory reads an entry with any of these from there, not file_name (data/parser.py)
_NOT_FROM_FILE = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
_SMALL_FILE = 64  # bytes: only a file this small is read for rows


def _file_without_rows(path: Path) -> bool:
    if not path.is_file():
        return False
    size = path.stat().st_size
    return size == 0 or (
        size <= _SMALL_FILE and path.read_text(encoding="utf-8", errors="replace").strip() in _EMPTY_TEXTS
    )


def check_dataset_names(key: str, names: list[str], dataset_dir: str, fix: str = "") -> None:
    """Every name is in ``dataset_info.json`` and its local file, if any, has rows; ``fix``: the advice for an
    unlisted name."""
    if not names or str(dataset_dir).startswith(NOT_LOCAL):
        return
    info = dataset_info(dataset_dir, key, names)
    listed = ", ".join(sorted(info)) or "nothing"
    for name in names:
        if name not in info:
            close = difflib.get_close_matches(name, list(info), n=1, cutoff=0.6)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            advice = fix or f"Name one of those, or add '{name}' to {DATA_CONFIG}."
            raise RecipeError(
                f"{key}: dataset '{name}' is not in {Path(dataset_dir) / DATA_CONFIG} (it lists: "
                f"{listed}).{hint} {advice}"
            )
        entry = info[name] if isinstance(info[name], dict) else {}
        file_name = entry.get("file_name")
        from_file = isinstance(file_name, str) and not any(key in entry for key in _NOT_FROM_FILE)
        if from_file and not (Path(dataset_dir) / file_name).exists():
            raise RecipeError(
                f"{key}: dataset '{name}' is listed in {Path(dataset_dir) / DATA_CONFIG} with file_name: "
                f"{file_name}, but {Path(dataset_dir) / file_name} does not exist. Put the file there, "
                "or correct its file_name (relative to dataset_dir)."
            )
        if isinstance(file_name, str) and _file_without_rows(Path(dataset_dir) / file_name):
            raise RecipeError(
                f"{key}: dataset '{name}' has no rows: its file {Path(dataset_dir) / file_name} is "
                "empty. Fill it (for HARC's roles: llamafactory-hera harc-data) or name another dataset."
            )


def check_output_dir(output_dir: Any, key: str = "output_dir") -> None:
    """``output_dir`` can be created or written, probed with a temporary file (exact for every user, root too);
    ``key`` names it in errors."""
    if not output_dir:
        return
    path = Path(str(output_dir)).expanduser().absolute()
    for attempt in range(3):  # a folder removed while probed (another rank clearing it at start): look again
        existing = path
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise RecipeError(
                f"{key}: {output_dir} cannot be created: {existing} is a file, not a folder. Choose an "
                f"{key} whose parent folders are folders."
            )
        try:
            with tempfile.NamedTemporaryFile(dir=existing, prefix=".hera_write_probe."):
                return
        except FileNotFoundError as err:
            if attempt < 2:
                continue
            failure: OSError = err
        except OSError as err:
            failure = err
        what = "written" if existing == path else f"created (it would go into {existing})"
        raise RecipeError(
            f"{key}: {output_dir} cannot be {what}: {failure.strerror or failure}. Choose a folder you can write to."
        ) from None


def _suggested_templates(vocab: set[str], multimodal: bool, model_type: str) -> list[str]:
    """Templates of the model's kind whose special tokens are all in ``vocab``, most specific first."""
    fitting = [t for t in template_tokens().values() if t.needed and t.needed <= vocab and t.multimodal == multimodal]
    if not fitting:
        return []
    most = max(len(t.needed) for t in fitting)
    best = [t.name for t in fitting if len(t.needed) == most]
    return sorted(best, key=lambda name: (-difflib.SequenceMatcher(None, name, model_type).ratio(), name))[:3]


def check_template(model_args: Any, data_args: Any) -> None:
    """``template``'s stop words and ``<|...|>`` markup are vocabulary tokens (else LLaMA-Factory adds ids the
    embeddings lack, or splits them). Skipped with ``resize_vocab: true`` or an unreadable tokenizer."""
    name = getattr(data_args, "template", None)
    if not name or getattr(model_args, "resize_vocab", False):
        return

    template = template_tokens().get(name)
    if template is None or not template.needed:
        return  # unknown: LLaMA-Factory's "Template ... does not exist" is one line already
    # lazy: transformers only when a recipe is checked
    from transformers import AutoConfig, AutoTokenizer

    source = str(model_args.model_name_or_path)
    trust = bool(getattr(model_args, "trust_remote_code", False))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust)
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust)
    except (OSError, ValueError, KeyError):
        return
    vocab = set(tokenizer.get_vocab())
    missing = sorted(template.needed - vocab)
    if not missing:
        return
    multimodal = any(getattr(config, key, None) is not None for key in ("vision_config", "audio_config"))
    kind = str(getattr(config, "model_type", ""))
    suggested = _suggested_templates(vocab, multimodal, kind)
    fix = (
        f"Set template: {suggested[0]}" + (f" (also fitting: {', '.join(suggested[1:])})" if suggested[1:] else "")
        if suggested
        else "Set template to the model's chat template"
    )
    raise RecipeError(
        f"template: {name} does not match the tokenizer of {source} ({kind}): its special tokens "
        f"{', '.join(missing)} are not in the vocabulary (they would become new tokens the model's "
        f"embeddings lack). {fix}, or resize_vocab: true to train new tokens."
    )


def check_max_samples(data_args: Any) -> None:
    """``max_samples`` keeps a row (with none, LLaMA-Factory's aligning ends in a bare ``StopIteration``)."""
    value = getattr(data_args, "max_samples", None)
    if value is not None and value < 1:
        raise RecipeError(
            f"max_samples: {value} keeps no row of any dataset (LLaMA-Factory keeps the first "
            "max_samples rows of each). Set max_samples to 1 or more, or remove it to use every row."
        )


def check_run_inputs(
    model_args: Any, data_args: Any, training_args: Any, datasets_used: bool = True, *, stage: str
) -> None:
    """Datasets, ``max_samples``, ``output_dir``, ``template``, FSDP set by a front end. ``datasets_used=False``:
    rows come from the stage's own keys."""
    fix = (
        ""
        if datasets_used
        else (
            "This stage does not read `dataset` (its rows come from its own keys): remove it, "
            "or name a dataset listed there."
        )
    )
    check_max_samples(data_args)
    check_dataset_names("dataset", as_names(getattr(data_args, "dataset", None)), str(data_args.dataset_dir), fix)
    check_dataset_names("eval_dataset", as_names(getattr(data_args, "eval_dataset", None)), str(data_args.dataset_dir))
    check_output_dir(getattr(training_args, "output_dir", None))
    check_template(model_args, data_args)
    check_fsdp_parsed(stage, training_args)
