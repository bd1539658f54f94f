"""FSDP, however it is turned on, is refused before anything loads, for every method, with why per method and FSDP
version.

FSDP is turned on by the recipe (``fsdp``, with ``fsdp_config``'s ``fsdp_version`` / ``version``: 1 by default), by
``accelerate launch`` with an FSDP config (``ACCELERATE_USE_FSDP``, ``FSDP_VERSION``), or by any front end that sets
the parsed ``fsdp`` option (LlamaBoard's extra arguments). :func:`check_fsdp` reads the first two before the parse,
:func:`check_fsdp_parsed` the parsed arguments.

FSDP2 (``fully_shard``) was measured on two CPU ranks (torch 2.11, gloo, accelerate 1.11, transformers 5.6, peft
0.18; issue 49): torch's FSDP2 itself runs on gloo (forward, backward, step, full state dict, DCP save and load), but

- accelerate 1.11 turns FSDP on only for accelerator process groups (GPU, NPU, XPU, ...): ``accelerate launch`` with
  an FSDP2 config on CPU sets ``ACCELERATE_USE_FSDP=true`` / ``FSDP_VERSION=2`` and then trains plain DDP over gloo,
  silently, so no CPU test can show a method under FSDP2;
- with that switch forced on (a test-only shim), stock LoRA SFT trains under FSDP2 with DDP's losses bit for bit and
  saves, but resuming restores only rank 0's shard of the adapter: the Trainer saves and loads
  ``pytorch_model_fsdp.bin`` with ``adapter_only`` (accelerate's ``FULL_STATE_DICT`` + PEFT path), which writes
  rank 0's DTensor shards (accelerate PR 4206); the first resumed step's loss was 6.1660 where the uninterrupted run
  had 6.1508;
- HeRA reads ``o_proj``'s weight by head outside ``o_proj``'s forward, where FSDP2 leaves each rank its shard.

DeepSpeed ZeRO-3 shards HeRA and HARC with LoRA and resumes; RAH-LoRA runs on one process.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llamafactory_hera.short_errors import RecipeError
from llamafactory_hera_patches.arguments import raw_value

# why a method cannot run under FSDP1 (FullyShardedDataParallel: whole weights are gathered only in the wrapped forward)
_FSDP = {
    "hera": "HeRA slices o_proj's weight by head and its monitor reads it between steps, outside the wrapped forward "
            "where FSDP gathers it",
    "rah": "RAH-LoRA runs on one process and edits whole V and O weights",
    "harc": "HARC reads the residual stream and the LoRA reference (adapter disabled) outside FSDP's wrapped forward",
}
_RESUME_BUG = ("accelerate 1.11 resumes a LoRA adapter under FSDP2 from rank 0's shard only, accelerate PR 4206; "
               "on CPU it trains an FSDP config as plain DDP, so no test here runs FSDP2")
# why a method cannot run under FSDP2 (fully_shard: each parameter is a DTensor shard outside its module's forward)
_FSDP2 = {
    "hera": "HeRA reads o_proj's weight by head outside o_proj's forward, where FSDP2 holds only this rank's shard; "
            f"{_RESUME_BUG}",
    "rah": _FSDP["rah"],
    "harc": _RESUME_BUG,
}
_FSDP_FIX = {
    "rah": "run it on one process: CUDA_VISIBLE_DEVICES=0 llamafactory-cli train RECIPE",
}
_DEFAULT_FSDP_FIX = ("shard with DeepSpeed ZeRO-3 instead (deepspeed: recipes/deepspeed/ds_z3_config.json; it trains "
                     "HeRA and HARC with LoRA and resumes), or run one process")
_LAUNCH_FIX = ("launch with llamafactory-cli train, or accelerate launch with a DeepSpeed ZeRO-3 config (the supported "
               "sharding), not an FSDP one")


def _set(value: Any) -> bool:
    """A recipe value that turns something on (not absent, empty, ``false`` or an empty list / dict)."""
    if isinstance(value, bool):
        return value
    return bool(value) and str(value).strip().lower() not in {"", "false", "0", "no", "off", "none", "[]", "{}"}


def _config_version(config: Any) -> str:
    """``fsdp_config``'s FSDP version as transformers reads it (a dict or a JSON file; ``fsdp_`` prefixes dropped),
    "1" when it names none."""
    if isinstance(config, str) and Path(config).expanduser().is_file():
        try:
            config = json.loads(Path(config).expanduser().read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return "1"
    if not isinstance(config, Mapping):
        return "1"
    return str(config.get("version", config.get("fsdp_version", 1))).strip()


def _fsdp_refusal(stage: str, what: str, version: str, fix: str = _DEFAULT_FSDP_FIX) -> RecipeError:
    reasons = _FSDP2 if version == "2" else _FSDP
    reason = reasons.get(stage, "the stage reads whole weights outside the wrapped forward, which FSDP shards")
    name = "FSDP2" if version == "2" else "FSDP"
    return RecipeError(f"{what}: stage: {stage} cannot run under {name} ({reason}); {_FSDP_FIX.get(stage, fix)}.")


def check_fsdp(stage: str, host_args: dict[str, Any] | list[str], environ: Mapping[str, str]) -> None:
    """No FSDP from the recipe's ``fsdp`` / ``fsdp_config`` or from ``accelerate launch``'s environment."""
    value = raw_value(host_args, "fsdp")
    if _set(value):  # fsdp_config alone is ignored by transformers (it warns), so it is no FSDP run
        config = raw_value(host_args, "fsdp_config")
        raise _fsdp_refusal(stage, f"fsdp: {value}" + (f" (fsdp_config: {config})" if _set(config) else ""),
                            _config_version(config))
    used = environ.get("ACCELERATE_USE_FSDP", "")
    if used.lower() == "true":  # exactly how accelerate's Accelerator reads it (1.11: "1" does not turn FSDP on)
        version = environ.get("FSDP_VERSION")
        shown = f"ACCELERATE_USE_FSDP={used}" + (f" (FSDP_VERSION={version})" if version else "")
        raise _fsdp_refusal(stage, f"{shown}, set by accelerate launch with an FSDP config",
                            (version or "1").strip(), _LAUNCH_FIX)


def check_fsdp_parsed(stage: str, training_args: Any) -> None:
    """The parsed ``fsdp`` option (set by any front end, e.g. LlamaBoard's extra arguments) is empty."""
    value = getattr(training_args, "fsdp", None)
    if value:
        shown = " ".join(str(getattr(option, "value", option)) for option in value) if isinstance(value, list) \
            else value
        raise _fsdp_refusal(stage, f"fsdp: {shown}", _config_version(getattr(training_args, "fsdp_config", None)))
