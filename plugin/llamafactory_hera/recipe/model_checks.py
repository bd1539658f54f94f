"""Checks of a plugin stage's model keys before LLaMA-Factory parses the recipe: the model and adapter paths, and
``lora_target`` against the model's own module names (read from its config on the meta device: no weight is loaded).
Run once for every stage by :func:`llamafactory_hera.recipe.checks.check_raw_recipe`.

Where LLaMA-Factory would fail otherwise:

- ``model_name_or_path`` (or an ``adapter_name_or_path``) that is a local path with a typo: huggingface_hub's
  ``Repo id must be in the form 'repo_name' or 'namespace/repo_name'`` in a traceback, as if it were a hub id;
- ``lora_target`` naming no module of the model: PEFT's ``No `target_modules` passed but also no `target_parameters`
  found`` after the model loaded, or, when another name of the list matches, a run that silently trains fewer
  modules than the recipe names.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

from llamafactory_hera.log import say
from llamafactory_hera.short_errors import RecipeError
from llamafactory_hera_patches.host_arguments import host_keys
from llamafactory_hera_patches.templates import composite_model_types

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # name or organisation/name


def _set(value: Any) -> Any:
    """``value``, or None where the recipe leaves the key unset (empty, ``none``, ``null``)."""
    return None if value is None or str(value).strip().lower() in {"", "none", "null"} else value


def _given(given: dict[str, Any], key: str) -> Any:
    return _set(given.get(key, host_keys()[key].default if key in host_keys() else None))


def is_local_path(value: str) -> bool:
    """Whether a model value means a folder on this machine: it exists, or it cannot be a hub id (``name`` or
    ``organisation/name``: an absolute path, ``./``, ``~``, two slashes or more). ``models/qwen`` that does not
    exist is left to the hub (a local ``Qwen/`` folder beside a recipe naming ``Qwen/Qwen2.5-7B`` is common)."""
    return Path(value).expanduser().exists() or not _HUB_ID.match(value) or value.startswith((".", "~"))


def _missing_path(key: str, value: str, started: str) -> str:
    path = Path(value).expanduser()
    parent = path.parent
    while not parent.is_dir() and parent != parent.parent:
        parent = parent.parent
    names = sorted(entry.name for entry in parent.iterdir() if entry.is_dir()) if parent.is_dir() else []
    close = difflib.get_close_matches(path.name, names, n=3, cutoff=0.5) if parent == path.parent else []
    far = parent not in (path.parent, Path("."), Path("/"))
    where = f"; {parent} has {', '.join(close)}" if close else f"; the nearest folder there is {parent}" if far else ""
    relative = "" if path.is_absolute() else f" (relative to the folder {started} starts in, {Path.cwd()})"
    return f"{key}: {value} is not a folder{relative} and not a Hugging Face model id (organisation/name){where}."


def check_model_paths(given: dict[str, Any], *, started: str = "the run", where: str = "",
                      fix: str | None = None) -> None:
    """``model_name_or_path`` is given; it and every ``adapter_name_or_path`` that is a local path is a folder, the
    model's holding its ``config.json``. The one check of the model paths: every plugin stage's raw recipe, ``select``
    (its parsed recipe), ``eval`` (each run's recorded keys). ``started``: what runs (a relative path is read from the
    folder it starts in); ``where``: put before the message (``eval``: the record the keys came from); ``fix``: the
    message's last sentence instead of the stage's (``eval``: mend the record). Reads no host default (``eval``'s
    errors load no library): both keys default to None."""
    model = _set(given.get("model_name_or_path"))
    if model is None:
        raise RecipeError(f"{where}model_name_or_path: not set; a run trains a model. Set it to the model's folder or "
                          "its Hugging Face id (e.g. Qwen/Qwen2.5-VL-7B-Instruct).")
    adapters = _set(given.get("adapter_name_or_path"))
    items = adapters if isinstance(adapters, list) else str(adapters or "").split(",")
    for key, value in [("model_name_or_path", str(model).strip()),
                       *(("adapter_name_or_path", str(item).strip()) for item in items if str(item).strip())]:
        holding = ("the model's config.json and weights" if key == "model_name_or_path"
                   else "the adapter's adapter_config.json")
        folder = Path(value).expanduser()
        if is_local_path(value) and not folder.exists():
            problem, own_fix = _missing_path(key, value, started), "Correct the path, or name a model id."
        elif folder.is_file():
            problem = f"{key}: {value} is a file, not a folder ({folder.absolute()})."
            own_fix = f"Point it at the folder holding {holding}, or name a model id."
        elif key == "model_name_or_path" and folder.is_dir() and not (folder / "config.json").is_file():
            problem = f"{key}: {value} is a folder without config.json, not a model's folder."
            own_fix = f"Point it at the folder holding {holding}."
        else:
            continue
        raise RecipeError(f"{where}{problem} {fix or own_fix}")


def _model_on_meta_device(source: str, trust: bool) -> Any:
    """The model LLaMA-Factory would load (its loader's class choice), built from the config with no weight, or None
    when the config cannot be read here (LLaMA-Factory then reports it itself) or the model cannot be built from it
    (one note line: the check is skipped)."""
    # transformers and accelerate only here: every other check of the raw recipe runs without them
    # lazy: accelerate and transformers only when a recipe is checked, not when the declarations are imported
    from accelerate import init_empty_weights
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoModelForSeq2SeqLM,
        AutoModelForTextToWaveform,
    )

    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust)
    except Exception:  # noqa: BLE001 - any failure (a remote-code config's own included) is LLaMA-Factory's to report
        return None
    for auto in (AutoModelForImageTextToText, AutoModelForSeq2SeqLM, AutoModelForTextToWaveform):
        if type(config) in auto._model_mapping.keys():
            break
    else:
        auto = AutoModelForCausalLM
    try:
        with init_empty_weights():
            return auto.from_config(config, trust_remote_code=trust)
    except Exception as error:  # noqa: BLE001 - a model (remote code) that cannot be built without weights: no check
        first = (str(error).strip().splitlines() or [""])[0][:200]
        say(f"note: lora_target not checked before loading: {source}'s model could not be built without its weights "
            f"here ({type(error).__name__}: {first}); PEFT checks it once the model has loaded.")
        return None


def _linear_names(model: Any) -> list[str]:
    """The last parts of the names of the model's linear modules (what ``lora_target: all`` takes, lm_head aside)."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if "Linear" in type(module).__name__ and "Embedding" not in type(module).__name__
                   and not name.endswith("lm_head") and not name.rsplit(".", 1)[-1].isdigit()})


def check_lora_target(given: dict[str, Any]) -> None:
    """With ``finetuning_type: lora``, every name of ``lora_target`` (other than ``all``) matches a module of the
    model: as PEFT matches it (the name or its last parts), or, for the multimodal models LLaMA-Factory knows, as a
    part of a module's name (LLaMA-Factory expands it so)."""
    target = _given(given, "lora_target")
    if str(_given(given, "finetuning_type")).strip() != "lora" or target is None:
        return
    names = [str(item).strip() for item in (target if isinstance(target, list) else str(target).split(","))]
    names = [name for name in names if name]
    if names == ["all"] or not names:
        return
    source = str(_given(given, "model_name_or_path"))
    model = _model_on_meta_device(source, str(_given(given, "trust_remote_code")).lower() in {"true", "1"})
    if model is None:
        return
    modules = [name for name, _ in model.named_modules() if name]
    kind = str(getattr(model.config, "model_type", ""))
    if kind in composite_model_types():
        def matches(name: str) -> bool:
            return any(name in module for module in modules)
    else:
        def matches(name: str) -> bool:
            return any(module == name or module.endswith(f".{name}") for module in modules)
    unmatched = [name for name in names if not matches(name)]
    if not unmatched:
        return
    linear = _linear_names(model)
    hints = [f"did you mean {close[0]} for {name}?" for name in unmatched
             if (close := difflib.get_close_matches(name, linear, n=1, cutoff=0.5))]
    what = f"{', '.join(unmatched)} {'names' if len(unmatched) == 1 else 'name'} no module"
    raise RecipeError(f"lora_target: {target}: {what} of {source} ({kind}); {' '.join(hints) + ' ' if hints else ''}"
                      f"its linear modules: {', '.join(linear)}. Set lora_target to some of those, comma-separated, "
                      "or all.")
