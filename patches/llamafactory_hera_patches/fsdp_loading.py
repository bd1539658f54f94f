"""A known host failure named before loading: FSDP2's memory-efficient loading of a bitsandbytes-quantized model.

``accelerate launch`` with ``fsdp_version: 2`` and ``fsdp_cpu_ram_efficient_loading: true`` (LLaMA-Factory's
examples/accelerate/fsdp2_config.yaml) loads the model on rank 0 and hands each rank its shards through accelerate's
``fsdp2_load_full_state_dict``. With ``quantization_bit`` (bitsandbytes) the state dict holds the quantization state
beside each packed weight (``...weight.absmax``, ``...weight.quant_map``, ...), which accelerate 1.11 (the newest
LLaMA-Factory 0.9.5 allows) looks up as a submodule: ``AttributeError: `weight` is not an nn.Module`` after the model
has loaded, stock LoRA SFT too (two CPU ranks under tests/fsdp_cpu's shim, 2026-11-26). With
``fsdp_cpu_ram_efficient_loading: false`` the same runs train (stock SFT; HARC gives one process's losses:
tests/harc/test_harc_stage.py). Refused for every training stage on those accelerate versions; a newer accelerate is
not refused (untested). Read from what ``accelerate launch`` sets; a recipe's own ``fsdp`` / ``fsdp_config`` keys set it
only as transformers parses them, after this check (the plugin's stages refuse those keys: recipe/fsdp.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from packaging.version import Version

from .arguments import raw_value
from .fsdp_adapter import launched_fsdp_version

NEWEST_FAILING = Version("1.11.0")  # the newest accelerate run here; LLaMA-Factory 0.9.5 caps it there
_BITSANDBYTES = {"bnb", "bitsandbytes"}
_TRUE = {"1", "true", "t", "yes", "y", "on"}  # what accelerate's str_to_bool reads as true


def _accelerate_fails() -> bool:
    try:
        return Version(version("accelerate")) <= NEWEST_FAILING
    except PackageNotFoundError:
        return False


def quantized_loading_refusal(stage: str, host_args: Any, environ: Mapping[str, str]) -> str | None:
    """The one-line refusal of ``host_args`` (a recipe's keys) under the FSDP2 launch ``environ`` describes, when
    accelerate would fail to load its bitsandbytes-quantized model, else None."""
    if launched_fsdp_version(environ) != "2":
        return None
    loading = environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "")
    bits = raw_value(host_args, "quantization_bit")
    method = str(raw_value(host_args, "quantization_method") or "bnb").lower()
    # 4-bit only: LLaMA-Factory refuses 8-bit itself under FSDP with this loading ("Only 4-bit quantized model can
    # use fsdp+qlora"), and 8-bit under FSDP2 without it is a path no run here took
    if loading.strip().lower() not in _TRUE or str(bits).strip() != "4" or method not in _BITSANDBYTES:
        return None
    if not _accelerate_fails():
        return None
    return (f"quantization_bit: {bits} under FSDP2 with fsdp_cpu_ram_efficient_loading: true "
            f"(FSDP_CPU_RAM_EFFICIENT_LOADING={loading}, set by accelerate launch): accelerate "
            f"{version('accelerate')} cannot hand each rank its shards of a bitsandbytes-quantized model (stage: "
            f"{stage} would fail after loading the model, in fsdp2_load_full_state_dict, as stock SFT does); set "
            "fsdp_cpu_ram_efficient_loading: false in the accelerate config.")
