"""Checks of the keys LLaMA-Factory reads, before its parse. Each raises one :class:`RecipeError` naming the key, the
value, why and the fix, where LLaMA-Factory would stop in a traceback naming neither, or after the model loaded.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from typing import Any

from llamafactory_hera.runtime.errors import RecipeError
from llamafactory_hera.runtime.raw_recipe import given_keys, truthy
from llamafactory_hera.runtime.registry import registered_methods
from llamafactory_hera_patches.recipe.arguments import method_fields
from llamafactory_hera_patches.recipe.host_arguments import host_keys, template_names, unknown_keys_pass

_SHOWN = 12  # most allowed values a message lists; more: the nearest only
_NULLS = {"none", "null", "~"}
_YAML_BOOLS = {False: ("no", "off", "false"), True: ("yes", "on", "true")}  # unquoted words YAML reads as booleans
# key -> (lowest, whether the lowest is allowed, highest or None, why): values that later end a run in a traceback
# or make it endless or empty
BOUNDS: dict[str, tuple[float, bool, float | None, str]] = {
    "cutoff_len": (1, True, None, "the longest tokenized row, in tokens"),
    "learning_rate": (0, True, None, "the optimizer's step size"),
    "per_device_train_batch_size": (1, True, None, "rows per device and step"),
    "per_device_eval_batch_size": (1, True, None, "rows per device and evaluation step"),
    "gradient_accumulation_steps": (1, True, None, "batches per optimizer step"),
    "lora_rank": (1, True, None, "the rank of each LoRA update"),
    "lora_dropout": (0, True, 1, "the probability of dropping a LoRA input"),
    "warmup_ratio": (0, True, 1, "a fraction of the training steps"),
    "weight_decay": (0, True, None, "AdamW's decay coefficient"),
    "logging_steps": (0, False, None, "steps between two logged losses (a fraction below 1: of the training steps)"),
    "save_steps": (0, False, None, "steps between two checkpoints (a fraction below 1: of the training steps)"),
    "max_grad_norm": (0, True, None, "the gradient clipping norm (0: no clipping)"),
    "val_size": (0, True, None, "the evaluation split, a fraction below 1 or a number of rows"),
}
# BOUNDS held only under a strategy: key -> (strategy key, that value, also its default)
_UNDER = {"logging_steps": ("logging_strategy", "steps"), "save_steps": ("save_strategy", "steps")}
# keys of older LLaMA-Factory releases (Ray's, up to 0.9.4) -> what takes their place now: the nearest spelling
# ("did you mean use_dora?") would send a user the wrong way
_RETIRED = {
    "use_ray": "Ray is switched on by the environment: USE_RAY=1 llamafactory-cli train recipe.yaml",
    "resources_per_worker": "LLaMA-Factory now gives each Ray worker one accelerator itself: use ray_num_workers",
    "placement_strategy": "LLaMA-Factory now places Ray's workers itself (PACK): use ray_num_workers",
    "ray_run_name": "Ray's workers now write into output_dir",
    "ray_storage_path": "Ray's workers now write into output_dir",
    "ray_storage_filesystem": "Ray's workers now write into output_dir",
}


def nearest(value: str, names: Iterable[str], count: int = 1, cutoff: float = 0.6) -> list[str]:
    return difflib.get_close_matches(value, list(names), n=count, cutoff=cutoff)


def _mean(value: str, names: Iterable[str]) -> str:
    close = nearest(value, names)
    return f"did you mean {close[0]}? " if close else ""


def method_keys() -> list[str]:
    return [spec.name for method in registered_methods() for spec in method_fields(method)]


def _suggested(name: str, names: list[str]) -> str:
    if name in _RETIRED:
        return f" (a key of older LLaMA-Factory releases; {_RETIRED[name]})"
    close = nearest(name, names)
    return f" (did you mean {close[0]}?)" if close else ""


def _is_host_key(name: str, known: dict[str, Any]) -> bool:
    # HfArgumentParser also takes --no_<flag> for a flag defaulting to true (a --key list only)
    return name in known or (
        name.startswith("no_") and known.get(name[3:]) is not None and known[name[3:]].default is True
    )


def check_unknown_keys(given: dict[str, Any]) -> None:
    """Every key (a stage's own taken out) is LLaMA-Factory's; an unknown one is named with the nearest known key.
    Skipped where LLaMA-Factory lets unknown keys pass."""
    known = host_keys()
    unknown = [name for name in given if not _is_host_key(str(name), known)]
    if not unknown or unknown_keys_pass():
        return
    names = [*known, *method_keys()]
    shown = "; ".join(f"{name}: {given[name]!r}{_suggested(str(name), names)}" for name in unknown)
    one = len(unknown) == 1
    raise RecipeError(
        f"{shown}: {'not a recipe key' if one else 'not recipe keys'} of LLaMA-Factory or of "
        f"llamafactory-hera (LLaMA-Factory would stop on {'it' if one else 'them'}). Correct the "
        f"spelling, or remove {'it' if one else 'them'}."
    )


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in _NULLS)


def _allowed(choices: tuple[str, ...], value: str) -> str:
    if len(choices) <= _SHOWN:
        return ", ".join(choices)
    return f"{len(choices)} values, among them {', '.join(nearest(value, choices, 3, 0.0))}"


def check_choices(given: dict[str, Any]) -> None:
    """A key typed ``Literal`` or ``Enum`` in the host's arguments has one of its values."""
    known = host_keys()
    for name, value in given.items():
        key = known.get(str(name))
        if key is None or not key.choices or name == "stage" or (key.optional and _is_null(value)):
            continue
        text = str(value).strip() if not isinstance(value, bool) else str(value).lower()
        if text in key.choices:
            continue
        what = "a fine-tuning method" if name == "finetuning_type" else f"a value {key.holder} accepts"
        words = [word for word in _YAML_BOOLS[value] if word in key.choices] if isinstance(value, bool) else []
        if words:  # save_strategy: no, unquoted, is the YAML boolean false
            raise RecipeError(
                f"{name}: {value} is not {what} ({_allowed(key.choices, text)}); YAML reads an unquoted "
                f"{words[0]} as {str(value).lower()}. Quote it: {name}: '{words[0]}'."
            )
        raise RecipeError(
            f"{name}: {value} is not {what} ({_allowed(key.choices, text)}); "
            f"{_mean(text, key.choices)}Set {name} to one of those."
        )


def check_template_name(given: dict[str, Any]) -> None:
    """``template`` is a chat template of LLaMA-Factory's (which fails only after loading the tokenizer)."""
    value = given.get("template")
    if _is_null(value):
        return
    names = template_names()
    if str(value).strip() in names:
        return
    close = nearest(str(value).strip(), names, 3, 0.5)
    hint = f"the nearest: {', '.join(close)}" if close else f"{len(names)} templates, e.g. llama3, qwen, qwen2_vl"
    raise RecipeError(
        f"template: {value} is not a chat template of LLaMA-Factory ({hint}). Set template to the model "
        "family's template (LLaMA-Factory's README lists each model's)."
    )


def _number(name: str, value: Any) -> float:
    number = None if isinstance(value, bool) else _number_or_none(value)
    if number is None:
        raise RecipeError(f"{name}: {value!r} is not a number; {name} is {BOUNDS[name][3]}. Set a number.")
    return number


def check_numbers(given: dict[str, Any]) -> None:
    """:data:`BOUNDS`' keys in bounds; ``num_train_epochs`` above 0 unless ``max_steps`` sets the length."""
    for name, (low, inclusive, high, why) in BOUNDS.items():
        strategy, value = _UNDER.get(name, ("", ""))
        if name not in given or _is_null(given[name]) or str(given.get(strategy, value)).strip() != value:
            continue
        number = _number(name, given[name])
        if number < low or (number == low and not inclusive) or (high is not None and number > high):
            lowest = f">= {low:g}" if inclusive else f"> {low:g}"
            allowed = lowest + (f" and <= {high:g}" if high is not None else "")
            raise RecipeError(
                f"{name}: {given[name]} is out of range: it is {why}, allowed {allowed}. Set {name} {allowed}."
            )
    max_steps = given.get("max_steps")
    steps = _number_or_none(max_steps)
    if "num_train_epochs" in given and (steps is None or steps <= 0):
        epochs = _number_or_none(given["num_train_epochs"])
        if epochs is None or epochs <= 0:
            raise RecipeError(
                f"num_train_epochs: {given['num_train_epochs']} trains no step (max_steps not set "
                "above 0). Set num_train_epochs above 0, or max_steps to the number of steps."
            )


def _reads_as(kind: type, value: Any) -> bool:
    try:
        kind(str(value).strip())
    except ValueError:
        return False
    return True


def check_number_types(given: dict[str, Any]) -> None:
    """A key LLaMA-Factory types ``int`` / ``float`` (but :data:`BOUNDS`') is a number: its parse passes a YAML
    string on (``image_max_pixels: big``: a ``TypeError`` later), and a ``--key value`` list stops in argparse."""
    known = host_keys()
    for name, value in given.items():
        key = known.get(str(name))
        if key is None or key.number is None or name in BOUNDS or isinstance(value, bool | int | float):
            continue
        if _is_null(value):
            if key.optional or key.default is None:
                continue
        elif isinstance(value, str) and _reads_as(key.number, value):
            continue
        what = "a whole number" if key.number is int else "a number"
        about = f"{key.help.strip().rstrip('.')}; " if key.help.strip() else ""
        raise RecipeError(
            f"{name}: {value!r} is not {what} ({key.holder}: {about}default {key.default}). Set {name} to {what}."
        )


def _number_or_none(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _flag(given: dict[str, Any], key: str) -> bool:
    return truthy(given.get(key, False))


def check_report_to(given: dict[str, Any]) -> None:
    # lazy: transformers only when a recipe is checked
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    value = given.get("report_to")
    names = value if isinstance(value, list) else str(value).split(",") if not _is_null(value) else []
    loggers = [*INTEGRATION_TO_CALLBACK, "all", "none"]
    for name in (str(item).strip() for item in names):
        if name and name not in loggers:
            raise RecipeError(
                f"report_to: {value} names no logger of transformers ({', '.join(loggers)}); "
                f"{_mean(name, loggers)}Set report_to to those, or none."
            )


def check_bf16_device(host_args: dict[str, Any] | list[str]) -> None:
    """``bf16`` / ``bf16_full_eval`` only where transformers finds a bf16 device, or with ``use_cpu: true``, as
    ``TrainingArguments`` tests: a check of this machine."""
    # the functions TrainingArguments calls, read from its module at check time
    from transformers import training_args  # lazy: as above

    given = given_keys(host_args)
    for key in ("bf16", "bf16_full_eval"):
        if (
            _flag(given, key)
            and not _flag(given, "use_cpu")
            and not training_args.is_torch_bf16_gpu_available()
            and not training_args.is_torch_xla_available()
        ):
            raise RecipeError(
                f"{key}: true, but transformers finds no device here that computes in bf16 (a GPU "
                "since Ampere, an NPU, an XPU). Remove bf16 to train in float32 here, or run on such "
                "a device."
            )


def check_host_keys(host_args: dict[str, Any] | list[str]) -> None:
    given = given_keys(host_args)
    check_unknown_keys(given)
    check_choices(given)
    check_template_name(given)
    check_numbers(given)
    check_number_types(given)
    check_report_to(given)
