"""The host stacks the plugin runs on: the transformers releases, the families a release lacks, known host bugs.

LLaMA-Factory 0.9.5 (PyPI) allows transformers 4.55 to 5.6 except 4.57.0; its main branch (0.9.6.dev0, a git
install) allows up to 5.8 and excludes 5.6.0. The plugin runs on every one of them: :data:`TRANSFORMERS_SUPPORTED`
(also the pyproject's bound). Tested stacks: docs/install.md. Nothing here imports transformers or LLaMA-Factory
(the start-up check reads the installed version from the package metadata).
"""

from __future__ import annotations

from typing import Any

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from .guard import host_version

# what LLaMA-Factory 0.9.5 or main allows: 4.55 to 5.8 (5.8.x), without 4.57.0 (both exclude it); also in pyproject
TRANSFORMERS_SUPPORTED = ">=4.55,<5.9,!=4.57.0"

# image-text families whose transformers class came after 4.55: model_type -> the first release that has it (read
# from each release's wheel, models/<type>/configuration_*.py). A recipe naming one on an older release is refused
# before loading (llamafactory_hera.recipe.stack_checks); docs/families.md says the same per row.
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

# image-text families LLaMA-Factory ships that the plugin's stages have not run on: model_type -> why. A recipe naming
# one is refused by name before loading (llamafactory_hera.recipe.stack_checks); docs/families.md says the same
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

# (transformers release, quantization_bit) -> what was measured wrong on it: a warning before loading, not a refusal
# (measured on the CPU only; a GPU's bitsandbytes kernels were not run)
HOST_WARNINGS: dict[tuple[str, str], str] = {
    ("5.8.0", "8"): "stock SFT's first-step LoRA gradients through LLaMA-Factory's 8-bit model differed from the "
    "dequantized model's by up to 77 % (one tensor's norm; tiny Llama-3, LLaMA-Factory main, measured "
    "on the CPU only, a GPU's kernels not checked, 2026-11-26), 2e-7 on transformers 5.7.0. Use "
    "quantization_bit: 4, or pip install 'transformers==5.7.0'.",
}


def dtype_key(found: str | None = None) -> str:
    """The name ``from_pretrained`` takes the dtype by: ``dtype`` from transformers 4.56, ``torch_dtype`` before."""
    found = installed() if found is None else found
    return "torch_dtype" if found is not None and Version(found) < Version("4.56") else "dtype"


def installed() -> str | None:
    """The installed transformers version, None when it is not installed."""
    found = host_version("transformers")
    return None if found == "unknown" else found


def unsupported_transformers(found: str | None = None) -> str | None:
    """One line refusing the installed transformers when it is outside :data:`TRANSFORMERS_SUPPORTED` (found,
    supported, the pip command), None when it is supported or not installed."""
    found = installed() if found is None else found
    if found is None or SpecifierSet(TRANSFORMERS_SUPPORTED).contains(Version(found), prereleases=True):
        return None
    return (
        f"llamafactory-hera: transformers {found} is not supported (supported: {TRANSFORMERS_SUPPORTED}, what "
        f"LLaMA-Factory 0.9.5 or main allows); pip install 'transformers{TRANSFORMERS_SUPPORTED}'"
    )


def family_too_new(model_type: str, found: str | None = None) -> str | None:
    """The first transformers release with ``model_type``'s class when the installed one is older, else None; a pre-
    or dev release counts as the release it leads to (5.5.0rc1 and 5.5.0.dev0 as 5.5.0)."""
    needed = FAMILY_MIN_TRANSFORMERS.get(model_type)
    found = installed() if found is None else found
    if needed is None or found is None or Version(Version(found).base_version) >= Version(needed):
        return None
    return needed


def host_warning(quantization_bit: Any, found: str | None = None) -> str | None:
    """What was measured wrong with ``quantization_bit`` on the installed transformers, None when nothing known."""
    found = installed() if found is None else found
    return HOST_WARNINGS.get((found or "", str(quantization_bit).strip()))


def host_bug(flash_attn: str, found: str | None = None) -> str | None:
    """What breaks with ``flash_attn`` on the installed transformers (a known host bug), None when nothing known."""
    found = installed() if found is None else found
    return HOST_BUGS.get((found or "", str(flash_attn).strip().lower()))
