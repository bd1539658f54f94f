"""Quantizations a stage runs on, checked before loading (``quantization_bit``, or the model's saved
``quantization_config``): bitsandbytes 4-bit (nf4, fp4, double quantization) and 8-bit, which HeRA and RAH-LoRA read
exactly. Others are refused by name, as is DoRA with quantization (HeRA, HARC); whys: docs/configurations.md (N3, N9,
N10).
"""

from __future__ import annotations

from typing import Any

from llamafactory_hera.runtime.errors import RecipeError

BITSANDBYTES = "bitsandbytes"  # transformers' quant_method; LLaMA-Factory's quantization_method calls it "bnb"


def saved_quantization(config: Any) -> dict[str, Any] | None:
    quantization = getattr(config, "quantization_config", None)
    if quantization is None:
        return None
    return quantization if isinstance(quantization, dict) else quantization.to_dict()


def quantization_in_use(model_args: Any, config: Any) -> tuple[str, int | None, str] | None:
    """(transformers' method name, bits or None, source), or None; the saved config wins (LLaMA-Factory's order)."""
    saved = saved_quantization(config)
    if saved is not None:
        method = saved.get("quant_method", "?")
        method = str(getattr(method, "value", method)).lower()  # the object form's to_dict() keeps the enum
        bits = 4 if saved.get("load_in_4bit") else 8 if saved.get("load_in_8bit") else saved.get("bits")
        return (
            method,
            bits,
            f"model_name_or_path: {model_args.model_name_or_path} (saved {method}-quantized: "
            "quantization_config in its config.json)",
        )
    bits = getattr(model_args, "quantization_bit", None)
    if bits is None:
        return None
    method = str(getattr(model_args, "quantization_method", "bnb") or "bnb").lower()
    method = BITSANDBYTES if method == "bnb" else method
    named = "bnb" if method == BITSANDBYTES else method
    return method, bits, f"quantization_bit: {bits} with quantization_method: {named}"


def width_refusal(bits: Any) -> str | None:
    """Why bitsandbytes does not run ``bits`` (None for 4 or 8), said before it is asked for (installing it would
    not make 3 bits run)."""
    if str(bits).strip() in ("4", "8"):
        return None
    return (
        f"quantization_bit: {bits}: bitsandbytes (quantization_method: bnb, the default) quantizes to 4 or 8 bits "
        "only. Set quantization_bit: 4 or 8, or remove it to train unquantized."
    )


def dora_refusal(bits: Any) -> str:
    return (
        f"use_dora: true with {bits}-bit bitsandbytes weights: LLaMA-Factory 0.9.5 refuses DoRA on every "
        "quantized model after loading it (model/adapter.py compares transformers' quant_method 'bitsandbytes' "
        "with its own 'bnb'; stage: sft fails the same way), and at 8-bit PEFT 0.18's DoRA forward fails from its "
        "second call. Use plain LoRA with quantization, or DoRA unquantized."
    )


def check_quantization(
    model_args: Any, config: Any, stage: str, reads: str | None = None, dora: bool = False
) -> tuple[str, int | None] | None:
    """Refuse any quantization but bitsandbytes 4-/8-bit, and ``dora`` with any; ``reads``: what the stage reads
    exactly (None: nothing, HARC). Returns (method, bits) or None."""
    quantization = quantization_in_use(model_args, config)
    if quantization is None:
        return None
    method, bits, source = quantization
    if method == BITSANDBYTES and bits in (4, 8):
        if dora:
            raise RecipeError(dora_refusal(bits))
        return method, bits
    if method == BITSANDBYTES:
        why = "bitsandbytes quantizes to 4 or 8 bits only. Set quantization_bit: 4 or 8"
    elif reads is None:
        why = (
            f"llamafactory-hera runs stage: {stage} on bitsandbytes 4-/8-bit weights only (no test loads {method} "
            "weights). Use an unquantized model, with quantization_bit: 4 or 8 (bitsandbytes) if memory is "
            "short"
        )
    elif method in ("fp8", "mxfp4"):
        why = (
            "LLaMA-Factory loads it dequantized (transformers' dequantize=True), a load llamafactory-hera has no "
            "test of. Dequantize the model once and train that, or use bitsandbytes"
        )
    else:
        why = (
            f"{method} stores packed codes in its kernels' own layout, which llamafactory-hera does not decode, so "
            "it cannot read them as weights. Use an unquantized model, with quantization_bit: 4 or 8 "
            "(bitsandbytes) if memory is short"
        )
    lead = f"reads {reads}, and {source} cannot be read exactly" if reads else f"is not run on {source}"
    raise RecipeError(f"stage: {stage} {lead}: {why}.")


NF4_BLOCK = 64  # bitsandbytes 4-bit: weights per absmax
NESTED_BLOCK = 256  # absmax values per second-level scale


def quantized_bytes_per_weight(bits: int, double_quant: bool = True, row_width: int | None = None) -> float:
    """Bytes bitsandbytes stores per linear weight, its scales included (no ``row_width``: 8-bit's not counted)."""
    if bits == 4:
        return 0.5 + ((1 + 4 / NESTED_BLOCK) if double_quant else 4) / NF4_BLOCK
    if bits == 8:
        return 1 + (4 / row_width if row_width else 0)
    raise ValueError(f"quantization_bit: bitsandbytes quantizes to 4 or 8 bits, not {bits}")
