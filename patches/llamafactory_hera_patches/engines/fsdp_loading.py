"""Host failures of FSDP2 with bitsandbytes weights, named before loading for every stage (stock SFT fails alike):
int8 or uint8-stored codes, which ``fully_shard`` cannot make DTensor parameters; 4-bit with
``fsdp_cpu_ram_efficient_loading: true`` on accelerate <= 1.11; 4-bit codes in another dtype than FSDP2's
mixed-precision all-gather. Causes and tests: docs/configurations.md (N17-N19).

Read from what ``accelerate launch`` sets (in its ranks, or the launcher); a recipe's own ``fsdp`` keys are refused by
recipe/fsdp.py.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from importlib.metadata import version
from pathlib import Path
from typing import Any

from packaging.version import Version

from llamafactory_hera.runtime.raw_recipe import raw_value, truthy

from .fsdp_adapter import launched_fsdp_version
from .fsdp_qlora import cast_codes_message

NEWEST_FAILING = Version("1.11.0")  # the newest accelerate run here; LLaMA-Factory 0.9.5 caps it there
_BITSANDBYTES = {"bnb", "bitsandbytes"}
# why FSDP2 fails on integer codes, and where they train instead (int8 and saved checkpoints)
_NO_INTEGER_SHARDS = (
    "torch's fully_shard makes each weight a parameter that could require gradients, which {codes} cannot"
)
_WITHOUT_FSDP = "on one GPU or under DDP / DeepSpeed ZeRO-2."


def saved_codes_refusal(stage: str, host_args: Any, saved: dict[str, Any]) -> str | None:
    """Refuse a bitsandbytes checkpoint (``saved``: its ``quantization_config``) whose codes FSDP2 cannot shard: int8,
    or 4-bit in the default uint8 storage (most on the Hub). ``fully_shard`` fails after loading; the host loads it as
    saved, whatever ``quantization_bit`` says."""
    if not _by_bitsandbytes(saved):
        return None
    storage = str(saved.get("bnb_4bit_quant_storage") or "uint8")
    codes = (
        "int8 codes"
        if saved.get("load_in_8bit")
        else (f"4-bit codes stored as {storage}" if saved.get("load_in_4bit") and storage == "uint8" else None)
    )
    if codes is None:
        return None
    return (
        f"model_name_or_path: {raw_value(host_args, 'model_name_or_path')} is saved quantized by bitsandbytes with "
        f"{codes} (quantization_config in its config.json), which FSDP2 cannot shard "
        f"({_NO_INTEGER_SHARDS.format(codes='integer codes')}; stage: {stage} fails on it after loading, as stock "
        "SFT does); train the unquantized checkpoint with quantization_bit: 4 (LLaMA-Factory stores the codes in "
        f"the compute dtype, which FSDP2 shards), or this one {_WITHOUT_FSDP}"
    )


def _by_bitsandbytes(saved: dict[str, Any]) -> bool:
    """Whether ``saved`` is bitsandbytes'."""
    return str(saved.get("quant_method", "")).lower() == "bitsandbytes"


def _host_misc(name: str) -> Any:
    """``llamafactory.extras.misc.<name>``, or None: the prediction needing it is skipped (fsdp_qlora still checks
    the loaded model)."""
    try:
        # lazy: the host loads when it runs, not with the patches at start-up
        import llamafactory.extras.misc as misc

        return getattr(misc, name, None)
    except ImportError:
        return None


def _saved_config(host_args: Any) -> dict[str, Any] | None:
    """``model_name_or_path``'s config.json: a local folder's, or a Hub id's via ``cached_file`` (the host fetches it
    first anyway). None if unreadable: the host then loads or says why not."""
    name = raw_value(host_args, "model_name_or_path")
    if not name:
        return None
    local = Path(str(name)).expanduser()
    try:
        if local.is_dir():  # a local folder, whichever hub is set
            path = local / "config.json"
        elif any(hub is None or hub() for hub in (_host_misc("use_modelscope"), _host_misc("use_openmind"))):
            return None  # another hub's id (USE_MODELSCOPE_HUB / USE_OPENMIND_HUB), or unknown
        else:
            from transformers.utils import cached_file  # lazy: CLI errors load no library

            path = cached_file(
                str(name),
                "config.json",
                revision=raw_value(host_args, "model_revision") or "main",
                cache_dir=raw_value(host_args, "cache_dir"),
                token=raw_value(host_args, "hf_hub_token"),
            )
        config = json.loads(Path(path).read_text(encoding="utf-8")) if path else None
        return config if isinstance(config, dict) else None
    except Exception:  # noqa: BLE001 - the host reports its own failure to read it
        return None


def loads_bitsandbytes_weights(host_args: Any) -> bool:
    """Whether the model is quantized by bitsandbytes: ``quantization_bit`` (method ``bnb``), or saved so."""
    method = str(raw_value(host_args, "quantization_method") or "bnb").lower()
    if raw_value(host_args, "quantization_bit") not in (None, "") and method in _BITSANDBYTES:
        return True
    return _by_bitsandbytes((_saved_config(host_args) or {}).get("quantization_config") or {})


def bitsandbytes_refusal(stage: str, host_args: Any, environ: Mapping[str, str]) -> str | None:
    """One-line refusal where FSDP2 (launched per ``environ``) would fail on the recipe's bitsandbytes model after
    loading, or convert its 4-bit codes as numbers; else None. config.json is read once (a Hub id: one fetch per
    rank)."""
    if launched_fsdp_version(environ) != "2":
        return None
    config = _saved_config(host_args)
    saved = (config or {}).get("quantization_config")
    if saved:  # loaded as saved, whatever quantization_bit says
        return saved_codes_refusal(stage, host_args, saved) or codes_dtype_refusal(host_args, environ, config)
    bits = str(raw_value(host_args, "quantization_bit")).strip()
    method = str(raw_value(host_args, "quantization_method") or "bnb").lower()
    if method not in _BITSANDBYTES:
        return None
    if bits == "8":
        return (
            f"quantization_bit: 8 under FSDP2 (ACCELERATE_USE_FSDP, set by accelerate launch with an FSDP config): "
            f"FSDP2 cannot shard bitsandbytes' int8 weights ({_NO_INTEGER_SHARDS.format(codes='int8')}; stage: "
            f"{stage} fails on it, as stock SFT does); use quantization_bit: 4 (QLoRA under FSDP2, with "
            f"fsdp_cpu_ram_efficient_loading: false in the accelerate config), or 8-bit {_WITHOUT_FSDP}"
        )
    loading = environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "")
    # truthy: accelerate's str_to_bool words; the host requires accelerate
    if bits != "4" or not truthy(loading) or Version(version("accelerate")) > NEWEST_FAILING:
        return codes_dtype_refusal(host_args, environ, config) if bits == "4" and config is not None else None
    return (
        f"quantization_bit: {bits} under FSDP2 with fsdp_cpu_ram_efficient_loading: true "
        f"(FSDP_CPU_RAM_EFFICIENT_LOADING={loading}, set by accelerate launch): accelerate "
        f"{version('accelerate')} cannot hand each rank its shards of a bitsandbytes-quantized model (stage: "
        f"{stage} would fail after loading the model, in fsdp2_load_full_state_dict, as stock SFT does); set "
        "fsdp_cpu_ram_efficient_loading: false in the accelerate config, as the plugin's "
        "recipes/accelerate/fsdp2_qlora_config.yaml does."
    )


# a precision flag's torch dtype (accelerate 1.11's FSDP2 gathers fp8 runs' weights in bf16)
_DTYPE_OF = {"bf16": "bfloat16", "fp16": "float16", "fp8": "bfloat16"}


def codes_dtype_refusal(host_args: Any, environ: Mapping[str, str], config: dict[str, Any]) -> str | None:
    """fsdp_qlora's refusal, before loading: 4-bit codes stored in another dtype than FSDP2's mixed-precision
    all-gather (docs/configurations.md, N19). ``fp16`` / ``bf16`` win over accelerate's ``mixed_precision`` (as in
    TrainingArguments); with neither, the host's ``infer_optim_dtype``."""

    def flag(*keys: str) -> bool:
        return any(truthy(raw_value(host_args, key)) for key in keys)

    mixed = "fp16" if flag("fp16") else "bf16" if flag("bf16") else None  # TrainingArguments' order
    compute = "bf16" if flag("bf16", "pure_bf16") else "fp16" if flag("fp16") else None  # LLaMA-Factory's order
    gathered = _DTYPE_OF.get(mixed or environ.get("ACCELERATE_MIXED_PRECISION", "no").strip().lower())
    if gathered is None:
        return None
    import torch  # lazy: CLI errors load no library

    gathered = getattr(torch, gathered)
    saved = config.get("quantization_config") or {}
    if saved:
        if not _by_bitsandbytes(saved) or not saved.get("load_in_4bit"):
            return None
        codes = getattr(torch, str(saved.get("bnb_4bit_quant_storage") or "uint8"), None)
    elif compute:
        codes = getattr(torch, _DTYPE_OF[compute])
    else:
        infer_optim_dtype = _host_misc("infer_optim_dtype")
        if infer_optim_dtype is None:
            return None
        dtype = config.get("dtype") or config.get("torch_dtype")
        codes = infer_optim_dtype(getattr(torch, dtype, None) if isinstance(dtype, str) else None)
    if not isinstance(codes, torch.dtype) or codes == gathered or not codes.is_floating_point:
        return None  # integer codes: saved_codes_refusal's
    source = f"the recipe's {mixed}: true" if mixed else "the accelerate config's mixed precision"
    return cast_codes_message(f"are stored as {codes} and {source} gathers them as {gathered}", gathered)
