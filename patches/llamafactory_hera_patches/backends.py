"""The host's backend switches: recipe keys and environment variables under which an SFT run uses another workflow
or model loader than the SFT trainer the plugin's stages extend. A plugin stage is refused under each by name
(:func:`refusal`) before the host parses the recipe. An environment switch counts only where the host reads it
(:func:`known`): ``USE_MEGATRON_BRIDGE`` is main's only.

Checked on LLaMA-Factory 0.9.5 and main: ``_training_function`` hands an ``sft`` run to another workflow before its
``stage == "sft"`` branch under ``use_hyper_parallel``, ``use_mca`` and main's ``use_megatron_bridge``; ``use_kt`` and
``use_unsloth`` load the model with their own code; :data:`TORCHRUN_SWITCHES` force torchrun.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llamafactory_hera.runtime.raw_recipe import raw_value, truthy


@dataclass(frozen=True)
class Switch:
    """``name``: a recipe key or an environment variable (upper case); ``reader``: the ``extras.packages`` function a
    host that reads the variable has (None: a recipe key, refused everywhere; a host lacking it refuses the key)."""

    name: str
    reader: str | None
    why: str

    @property
    def environment(self) -> bool:
        return self.name.isupper()


SWITCHES = (
    Switch(
        "use_hyper_parallel",
        None,
        "LLaMA-Factory hands the run to its hyper-parallel SFT workflow before the SFT branch the plugin's stages "
        "run in",
    ),
    Switch(
        "USE_MEGATRON_BRIDGE",
        "is_megatron_bridge_available",
        "LLaMA-Factory hands the run to its Megatron-Bridge workflow, under torchrun, before the SFT branch the "
        "plugin's stages run in",
    ),
    Switch(
        "USE_MCA",
        "is_mcore_adapter_available",
        "LLaMA-Factory hands the run to its Megatron-Core workflow (mcore_adapter), under torchrun, before the SFT "
        "branch the plugin's stages run in",
    ),
    Switch(
        "use_kt",
        None,
        "KTransformers loads the model with its own kernels and its own LoRA layers, which the plugin's stages "
        "neither read nor were run with",
    ),
    Switch(
        "use_unsloth",
        None,
        "Unsloth replaces the model's attention, LoRA and gradient-checkpointing code with its own, which the "
        "plugin's stages were not run with (Unsloth needs a GPU)",
    ),
)
TORCHRUN_SWITCHES = ("USE_MCA", "USE_MEGATRON_BRIDGE")  # the launcher starts torchrun


def known(switch: Switch) -> bool:
    """Whether the installed host reads ``switch`` (a recipe key: always)."""
    if switch.reader is None:
        return True
    # lazy: the host loads when it runs, not with the patches at start-up
    import llamafactory.extras.packages as packages

    return hasattr(packages, switch.reader)


def _enabled(value: Any) -> bool:
    # LLaMA-Factory's is_env_enabled: "true", "y" or "1", any case, nothing around it (" 1" and "yes" are off)
    return str(value).lower() in {"true", "y", "1"}


def forced_torchrun(environ: Mapping[str, str]) -> bool:
    """Whether an environment switch makes the launcher start torchrun."""
    switches = [switch for switch in SWITCHES if switch.name in TORCHRUN_SWITCHES]
    return any(_enabled(environ.get(switch.name, "")) and known(switch) for switch in switches)


def refusal(stage: str, host_args: dict[str, Any] | list[str], environ: Mapping[str, str]) -> str | None:
    """The line refusing ``stage`` under the first switch ``host_args`` or ``environ`` turns on, else None."""
    for switch in SWITCHES:
        if switch.environment:
            value = environ.get(switch.name, "")
            if not (_enabled(value) and known(switch)):
                continue
            given = f"{switch.name}={value}"
            fix = f"unset {switch.name}"
        else:
            value = raw_value(host_args, switch.name)
            if not truthy(value):
                continue
            given = f"{switch.name}: {str(value).lower()}"
            fix = f"remove {switch.name}"
        return (
            f"stage: {stage} cannot run with {given} ({switch.why}). To train it, {fix} (docs/configurations.md "
            "says what each stage runs with); for LLaMA-Factory's own SFT there, use stage: sft."
        )
    return None
