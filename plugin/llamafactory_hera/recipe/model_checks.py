"""``lora_target`` against the model's module names (built on the meta device), before the parse: PEFT would fail
after the model loaded, or, where another listed name matches, silently train fewer modules than named.
"""

from __future__ import annotations

import difflib
from typing import Any

from llamafactory_hera.recipe.model_paths import value_or_none
from llamafactory_hera.runtime.errors import RecipeError
from llamafactory_hera.runtime.log import say
from llamafactory_hera.runtime.raw_recipe import truthy
from llamafactory_hera_patches.data.templates import composite_model_types
from llamafactory_hera_patches.recipe.host_arguments import host_keys


def _given(given: dict[str, Any], key: str) -> Any:
    return value_or_none(given.get(key, host_keys()[key].default if key in host_keys() else None))


def _model_on_meta_device(source: str, trust: bool) -> Any:
    """The model LLaMA-Factory would load, built weightless; None when the config cannot be read (LLaMA-Factory
    reports it) or the model cannot be built (a note line: check skipped)."""
    # lazy: accelerate and transformers only when a recipe is checked
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
        say(
            f"note: lora_target not checked before loading: {source}'s model could not be built without its weights "
            f"here ({type(error).__name__}: {first}); PEFT checks it once the model has loaded."
        )
        return None


def _linear_names(model: Any) -> list[str]:
    """Last name parts of the model's linear modules (what ``lora_target: all`` takes, lm_head aside)."""
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if "Linear" in type(module).__name__
            and "Embedding" not in type(module).__name__
            and not name.endswith("lm_head")
            and not name.rsplit(".", 1)[-1].isdigit()
        }
    )


def check_lora_target(given: dict[str, Any]) -> None:
    """With ``finetuning_type: lora``, each ``lora_target`` name but ``all`` matches a module as PEFT matches (the
    name or its last parts), or, for multimodal models LLaMA-Factory knows, as part of a name (as it expands them)."""
    target = _given(given, "lora_target")
    if str(_given(given, "finetuning_type")).strip() != "lora" or target is None:
        return
    names = [str(item).strip() for item in (target if isinstance(target, list) else str(target).split(","))]
    names = [name for name in names if name]
    if names == ["all"] or not names:
        return
    source = str(_given(given, "model_name_or_path"))
    model = _model_on_meta_device(source, truthy(_given(given, "trust_remote_code")))
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
    hints = [
        f"did you mean {close[0]} for {name}?"
        for name in unmatched
        if (close := difflib.get_close_matches(name, linear, n=1, cutoff=0.5))
    ]
    what = f"{', '.join(unmatched)} {'names' if len(unmatched) == 1 else 'name'} no module"
    raise RecipeError(
        f"lora_target: {target}: {what} of {source} ({kind}); {' '.join(hints) + ' ' if hints else ''}"
        f"its linear modules: {', '.join(linear)}. Set lora_target to some of those, comma-separated, "
        "or all."
    )
