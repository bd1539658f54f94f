"""The host stacks the plugin runs on: transformers releases, the families a release lacks, known host bugs.

LLaMA-Factory 0.9.5 (PyPI) allows transformers 4.55 to 5.6 except 4.57.0; main (0.9.6.dev0, git) allows up to 5.8 and
excludes 5.6.0. The plugin runs on all of them: :data:`TRANSFORMERS_SUPPORTED` (pyproject's bound too). Tested stacks:
docs/install.md. Nothing here imports transformers or LLaMA-Factory (versions come from package metadata).
"""

from __future__ import annotations

from typing import Any

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from .guard import host_version

TRANSFORMERS_SUPPORTED = ">=4.55,<5.9,!=4.57.0"

# image-text families added after 4.55: model_type -> first release with it (per each wheel's
# models/<type>/configuration_*.py); older ones refused before loading (recipe.stack_checks; docs/families.md alike)
FAMILY_MIN_TRANSFORMERS: dict[str, str] = {
    "glm4v_moe": "4.56.0",
    "dinov3_vit": "4.56.0",  # DINOv3: a HeRA teacher
    "qwen3_vl": "4.57.1",
    "qwen3_vl_moe": "4.57.1",
    "lfm2_vl": "4.57.1",  # in 4.57.0, which LLaMA-Factory excludes
    "ernie4_5_vl_moe": "5.0.0",
    "glm_ocr": "5.1.0",
    "qwen3_5": "5.2.0",
    "qwen3_5_moe": "5.2.0",
    "gemma4": "5.5.0",
}

# image-text families the host ships that the plugin's stages have not run on: model_type -> why; refused before
# loading (recipe.stack_checks; docs/families.md alike)
FAMILY_REFUSED: dict[str, str] = {
    "moss_vl": "LLaMA-Factory main runs MOSS-VL from the checkpoint's own code (trust_remote_code) on transformers "
    "4.57.1 with torchcodec 0.7.0 only (it refuses any other release when it loads the model), and no test of the "
    "plugin's stages can load that code",
}

# (transformers release, flash_attn value) -> what breaks, and the way out
HOST_BUGS: dict[tuple[str, str], str] = {
    ("5.6.0", "fa2"): "transformers 5.6.0's flash-attention 2 path fails in flash_attention_forward (s_aux is None; "
    "LLaMA-Factory issue 10610). Use flash_attn: sdpa, or transformers >= 5.7 with LLaMA-Factory "
    "main (pip install 'transformers>=5.7,<5.9' after installing LLaMA-Factory from its git main).",
}

# (transformers release, quantization_bit) -> what was measured wrong (CPU only): a warning before loading
HOST_WARNINGS: dict[tuple[str, str], str] = {
    ("5.8.0", "8"): "stock SFT's first-step LoRA gradients through LLaMA-Factory's 8-bit model differed from the "
    "dequantized model's by up to 77 % (one tensor's norm; tiny Llama-3, LLaMA-Factory main, measured "
    "on the CPU only, a GPU's kernels not checked, 2026-11-26), 2e-7 on transformers 5.7.0. Use "
    "quantization_bit: 4, or pip install 'transformers==5.7.0'.",
}


def dtype_key(found: str | None = None) -> str:
    """``from_pretrained``'s dtype keyword: ``dtype`` from transformers 4.56, ``torch_dtype`` before."""
    found = installed() if found is None else found
    return "torch_dtype" if found is not None and Version(found) < Version("4.56") else "dtype"


def installed() -> str | None:
    """The installed transformers version, or None."""
    found = host_version("transformers")
    return None if found == "unknown" else found


def unsupported_transformers(found: str | None = None) -> str | None:
    """One line refusing an installed transformers outside :data:`TRANSFORMERS_SUPPORTED`, else None."""
    found = installed() if found is None else found
    if found is None or SpecifierSet(TRANSFORMERS_SUPPORTED).contains(Version(found), prereleases=True):
        return None
    return (
        f"llamafactory-hera: transformers {found} is not supported (supported: {TRANSFORMERS_SUPPORTED}, what "
        f"LLaMA-Factory 0.9.5 or main allows); pip install 'transformers{TRANSFORMERS_SUPPORTED}'"
    )


def family_too_new(model_type: str, found: str | None = None) -> str | None:
    """The first release with ``model_type``'s class if the installed one is older, else None (5.5.0rc1 and
    5.5.0.dev0 count as 5.5.0)."""
    needed = FAMILY_MIN_TRANSFORMERS.get(model_type)
    found = installed() if found is None else found
    if needed is None or found is None or Version(Version(found).base_version) >= Version(needed):
        return None
    return needed


def host_warning(quantization_bit: Any, found: str | None = None) -> str | None:
    """What was measured wrong with ``quantization_bit`` on the installed transformers, or None."""
    found = installed() if found is None else found
    return HOST_WARNINGS.get((found or "", str(quantization_bit).strip()))


def host_bug(flash_attn: str, found: str | None = None) -> str | None:
    """A known host bug with ``flash_attn`` on the installed transformers, or None."""
    found = installed() if found is None else found
    return HOST_BUGS.get((found or "", str(flash_attn).strip().lower()))
