"""A known host failure named before loading: FSDP2's memory-efficient loading of a bitsandbytes-quantized model.

``accelerate launch`` with ``fsdp_version: 2`` and ``fsdp_cpu_ram_efficient_loading: true`` (LLaMA-Factory's
examples/accelerate/fsdp2_config.yaml) loads the model on rank 0 and hands each rank its shards through accelerate's
``fsdp2_load_full_state_dict``. With ``quantization_bit`` (bitsandbytes) the state dict holds the quantization state
beside each packed weight (``...weight.absmax``, ``...weight.quant_map``, ...), which accelerate 1.11 (the newest
LLaMA-Factory 0.9.5 allows) looks up as a submodule: ``AttributeError: `weight` is not an nn.Module`` after the model
has loaded, stock LoRA SFT too (two CPU ranks under tests/fsdp_cpu's shim, 2026-11-26). With
``fsdp_cpu_ram_efficient_loading: false`` the same runs train (stock SFT; HARC gives one process's losses:
tests/harc/test_harc_stage.py). Refused for every training stage on those accelerate versions; a newer accelerate is
not refused (untested).
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from packaging.version import Version

from .arguments import raw_value

NEWEST_FAILING = Version("1.11.0")  # the newest accelerate run here; LLaMA-Factory 0.9.5 caps it there
_BITSANDBYTES = {"bnb", "bitsandbytes"}


def _accelerate_fails() -> bool:
    try:
        return Version(version("accelerate")) <= NEWEST_FAILING
    except PackageNotFoundError:
        return False


def quantized_loading_refusal(stage: str, host_args: Any, environ: Mapping[str, str]) -> str | None:
    """The one-line refusal of ``host_args`` (a recipe's keys) under the FSDP2 launch ``environ`` describes, when
    accelerate would fail to load its bitsandbytes-quantized model, else None."""
    if environ.get("ACCELERATE_USE_FSDP", "").lower() != "true" or (environ.get("FSDP_VERSION") or "1") != "2":
        return None
    loading = environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "")
    bits = raw_value(host_args, "quantization_bit")
    method = str(raw_value(host_args, "quantization_method") or "bnb").lower()
    if loading.lower() not in {"true", "1"} or bits in (None, "", "null") or method not in _BITSANDBYTES:
        return None
    if not _accelerate_fails():
        return None
    return (f"quantization_bit: {bits} under FSDP2 with fsdp_cpu_ram_efficient_loading: true "
            f"(FSDP_CPU_RAM_EFFICIENT_LOADING={loading}, set by accelerate launch): accelerate "
            f"{version('accelerate')} cannot hand each rank its shards of a bitsandbytes-quantized model (stage: "
            f"{stage} would fail after loading the model, in fsdp2_load_full_state_dict, as stock SFT does); set "
            "fsdp_cpu_ram_efficient_loading: false in the accelerate config.")
