"""FSDP2 from ``accelerate launch`` runs HeRA and HARC; any other FSDP is refused before loading, naming the key, the
value and the fix. FSDP is set by accelerate's FSDP config (environment), by the recipe (``fsdp``; ``fsdp_config``'s
version, default 1) or by a front end's parsed ``fsdp`` option: :func:`check_fsdp` reads the first two before the
parse, :func:`check_fsdp_parsed` the third. Whys and tests: docs/configurations.md (FSDP rows).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llamafactory_hera.runtime.errors import RecipeError
from llamafactory_hera.runtime.raw_recipe import raw_value
from llamafactory_hera.runtime.run_record import read_record
from llamafactory_hera_patches.engines.fsdp_adapter import launched_fsdp_version, unsaved_refusal
from llamafactory_hera_patches.engines.fsdp_loading import bitsandbytes_refusal

RAH_ONE_PROCESS = (
    "stage: rah runs as one process that places the model over every visible GPU; run it so: "
    "llamafactory-cli train RECIPE with FORCE_TORCHRUN unset (it starts one rank for stage: rah), "
    "not torchrun or accelerate launch with several"
)
_LAUNCH = (
    "accelerate launch --config_file with fsdp_version: 2 and fsdp_state_dict_type: FULL_STATE_DICT (as "
    "LLaMA-Factory's examples/accelerate/fsdp2_config.yaml)"
)
# FSDP1 on two CPU ranks: without sync_module_states (its default needs an accelerator) torch 2.11's FSDP1 refuses
# a CPU-only process ("FSDP needs a non-CPU accelerator device")
_FSDP1_UNTESTED = "no CPU run can reach FSDP1's training here (accelerate 1.11's FSDP1 setup needs an accelerator)"
_FSDP1 = {  # why a method is not run under FSDP1 (FullyShardedDataParallel)
    "hera": f"{_FSDP1_UNTESTED}, and outside a wrapped module's forward FSDP1 leaves each parameter a view of this "
    "rank's flat shard, where HeRA reads o_proj's weight by head",
    "harc": _FSDP1_UNTESTED,
}


def _set(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    return bool(value) and str(value).strip().lower() not in {"", "false", "0", "no", "off", "none", "[]", "{}"}


def _config_version(config: Any) -> str:
    """``fsdp_config``'s FSDP version as transformers reads it (dict or JSON file); "1" when unnamed."""
    if isinstance(config, str) and Path(config).expanduser().is_file():
        config = read_record(Path(config).expanduser())  # {} when not a JSON object
    if not isinstance(config, Mapping):
        return "1"
    return str(config.get("version", config.get("fsdp_version", 1))).strip()


def _recipe_refusal(stage: str, what: str) -> RecipeError:
    if stage == "rah":
        return RecipeError(f"{what}: {RAH_ONE_PROCESS}.")
    return RecipeError(
        f"{what}: stage: {stage} runs under FSDP2 started by accelerate launch, not by the recipe's "
        f"fsdp key (transformers then builds its own FSDP plugin, a path no test here runs); remove "
        f"fsdp and fsdp_config from the recipe and launch with {_LAUNCH}."
    )


def check_fsdp(stage: str, host_args: dict[str, Any] | list[str], environ: Mapping[str, str]) -> None:
    """FSDP only as it runs: ``accelerate launch`` with an FSDP2 config saving ``FULL_STATE_DICT``, HeRA or HARC."""
    value = raw_value(host_args, "fsdp")
    if _set(value):  # fsdp_config alone is ignored by transformers (it warns), so it is no FSDP run
        config = raw_value(host_args, "fsdp_config")
        raise _recipe_refusal(
            stage,
            f"fsdp: {value}"
            + (f" (fsdp_config: {config}, FSDP version {_config_version(config)})" if _set(config) else ""),
        )
    version = launched_fsdp_version(environ)  # as accelerate's Accelerator reads it (1.11: "1" does not turn it on)
    if version is None:
        return
    shown = f"ACCELERATE_USE_FSDP={environ['ACCELERATE_USE_FSDP']}" + (
        f" (FSDP_VERSION={environ['FSDP_VERSION']})" if environ.get("FSDP_VERSION") else ""
    )
    launched = f"{shown}, set by accelerate launch with an FSDP config"
    if stage == "rah":
        raise RecipeError(f"{launched}: {RAH_ONE_PROCESS}.")
    if version != "2":
        raise RecipeError(
            f"{launched}: stage: {stage} is not run under FSDP1 ({_FSDP1.get(stage, _FSDP1['harc'])});"
            f" set fsdp_version: 2 in the accelerate config."
        )
    # the host's stages: the second refused, the first said (patches/stage.py)
    refusal = unsaved_refusal(stage, environ) or bitsandbytes_refusal(stage, host_args, environ)
    if refusal:
        raise RecipeError(refusal)


def check_fsdp_parsed(stage: str, training_args: Any) -> None:
    value = getattr(training_args, "fsdp", None)
    if value:
        shown = (
            " ".join(str(getattr(option, "value", option)) for option in value) if isinstance(value, list) else value
        )
        raise _recipe_refusal(stage, f"fsdp: {shown}")
