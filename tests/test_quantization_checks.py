"""recipe/quantization.py: which quantizations the weight-reading stages take (bitsandbytes 4/8-bit) and which they
refuse by name, from the recipe and from a checkpoint's quantization_config; HeRA's own limit (DoRA with
quantization)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from transformers import BitsAndBytesConfig

from llamafactory_hera.hera.checks import check_quantized_hera
from llamafactory_hera.recipe.quantization import check_readable_quantization
from llamafactory_hera.short_errors import RecipeError


def _args(bits: int | None = None, method: str = "bnb") -> SimpleNamespace:
    return SimpleNamespace(model_name_or_path="/m", quantization_bit=bits, quantization_method=method)


def _config(quantization: object = None) -> SimpleNamespace:
    return SimpleNamespace(quantization_config=quantization)


def test_bitsandbytes_is_read_from_the_recipe_and_from_the_checkpoint() -> None:
    assert check_readable_quantization(_args(), _config(), "hera", "W_O") is None
    assert check_readable_quantization(_args(4), _config(), "hera", "W_O") == ("bitsandbytes", 4)
    assert check_readable_quantization(_args(8), _config(), "hera", "W_O") == ("bitsandbytes", 8)
    saved = BitsAndBytesConfig(load_in_8bit=True)  # the object form, and the dict form config.json gives
    assert check_readable_quantization(_args(), _config(saved), "hera", "W_O") == ("bitsandbytes", 8)
    assert check_readable_quantization(_args(4), _config({"quant_method": "bitsandbytes", "load_in_4bit": True}),
                                       "hera", "W_O") == ("bitsandbytes", 4)  # the checkpoint's wins


def test_bitsandbytes_at_another_width_is_refused() -> None:
    with pytest.raises(RecipeError, match="quantization_bit: 2 with quantization_method: bnb cannot be read exactly: "
                                          "bitsandbytes quantizes to 4 or 8 bits only"):
        check_readable_quantization(_args(2), _config(), "hera", "W_O")


@pytest.mark.parametrize("method", ["hqq", "eetq", "gptq", "quanto"])
def test_another_method_in_the_recipe_is_refused_by_name(method: str) -> None:
    with pytest.raises(RecipeError, match=f"stage: hera reads W_O, and quantization_bit: 4 with quantization_method: "
                                          f"{method} cannot be read exactly: {method} stores packed codes"):
        check_readable_quantization(_args(4, method), _config(), "hera", "W_O")


@pytest.mark.parametrize("method", ["gptq", "awq", "aqlm", "hqq", "eetq", "fp8", "mxfp4", "compressed-tensors"])
def test_a_checkpoint_saved_in_another_method_is_refused_by_name_even_with_bitsandbytes_bits(method: str) -> None:
    with pytest.raises(RecipeError, match=f"model_name_or_path: /m \\(saved {method}-quantized"):
        check_readable_quantization(_args(4), _config({"quant_method": method, "bits": 4}), "rah", "V and O")


def test_hera_refuses_dora_with_quantization() -> None:
    check_quantized_hera(("bitsandbytes", 4), dora=False)
    check_quantized_hera(None, dora=True)
    for bits in (4, 8):
        with pytest.raises(RecipeError, match=f"use_dora: true with {bits}-bit bitsandbytes weights: LLaMA-Factory"):
            check_quantized_hera(("bitsandbytes", bits), dora=True)
