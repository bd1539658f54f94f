"""patches/fsdp_qlora.py: accelerate's FSDP2 mixed-precision upcast leaves bitsandbytes' packed 4-bit weights as they
are. Why: a float32 round trip of bf16-stored codes, as the upcast and FSDP2's bf16 all-gather make it, rewrites every
NaN-shaped pair of bytes (a reference computation below). That the start-up hook replaces accelerate's function, and
what it does to the parameters; on two ranks, that the forward gets the codes loaded, for HeRA and for the stock SFT
twin, is tests/hera/test_hera_recipe_hardware.py::test_the_fsdp2_recipe_trains_with_hera_on_two_ranks."""

from __future__ import annotations

import importlib.util

import accelerate.accelerator as accelerator
import accelerate.utils as accelerate_utils
import accelerate.utils.fsdp_utils as fsdp_utils
import pytest
import torch
from torch import nn

from llamafactory_hera_patches import fsdp_qlora


def _codes(storage: torch.dtype, rows: int = 512) -> tuple[torch.Tensor, object]:
    bnb = pytest.importorskip("bitsandbytes")  # the stacks without it quantize nothing; the hook is tested there too
    torch.manual_seed(0)
    weight = torch.randn(rows, 512, dtype=torch.bfloat16) * 0.02
    return bnb.functional.quantize_4bit(weight, quant_type="nf4", quant_storage=storage, compress_statistics=True)


def test_a_float32_round_trip_rewrites_bf16_stored_codes() -> None:
    """The hazard, computed independently: bf16 -> float32 -> bf16 (the upcast, then FSDP2's all-gather cast) keeps
    every number but writes each NaN as the canonical one, so the codes of those bytes change (0.082 % of a
    4096 x 4096 weight's storage elements, 5.6 % of its norm, measured). Byte for byte, and through dequantization."""
    packed, state = _codes(torch.bfloat16)
    bnb = pytest.importorskip("bitsandbytes")
    trip = packed.float().bfloat16()
    bits, trip_bits = packed.view(torch.int16), trip.view(torch.int16)
    nan_shaped = torch.isnan(packed).squeeze(1) & (bits.squeeze(1) != trip_bits.squeeze(1))
    assert int(nan_shaped.sum()) > 0 and torch.equal(bits != trip_bits, nan_shaped[:, None])
    before, after = (bnb.functional.dequantize_4bit(codes, state) for codes in (packed, trip))
    assert (before != after).any()


def test_the_installed_accelerate_is_patched() -> None:
    """accelerate 1.11 upcasts (read from its source); the hook replaced the function where it lives and where
    ``accelerate.utils`` re-exports it (the Accelerator imports it from there)."""
    assert fsdp_qlora.upcasts(fsdp_utils)
    patched = fsdp_utils.fsdp2_prepare_model
    assert patched.__code__.co_qualname == "apply.<locals>.fsdp2_prepare_model"  # __qualname__ is the wrapped one's
    assert accelerate_utils.fsdp2_prepare_model is accelerator.fsdp2_prepare_model is patched


def test_an_accelerate_without_the_upcast_is_left_as_it_is(tmp_path) -> None:
    path = tmp_path / "fsdp_utils_copy.py"
    path.write_text("def fsdp2_prepare_model(accelerator, model):\n    return model\n", encoding="utf-8")
    spec = importlib.util.spec_from_file_location("fsdp_utils_copy", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    original = module.fsdp2_prepare_model
    fsdp_qlora.apply(module)
    assert module.fsdp2_prepare_model is original


def test_the_upcast_converts_all_but_the_4bit_weights() -> None:
    """A model of a bf16 Linear, a 4-bit layer with bf16 storage, and a bf16 buffer, through the upcast accelerate
    calls (``model.to(torch.float32)``, with the patch's instance ``to`` in place): the Linear and the buffer in
    float32, the 4-bit weight the very tensor it was, its codes unchanged; without the 4-bit layer, nothing kept."""
    packed, state = _codes(torch.bfloat16, rows=64)
    bnb = pytest.importorskip("bitsandbytes")
    quantized = bnb.nn.Linear4bit(512, 64, bias=False, compute_dtype=torch.bfloat16, quant_storage=torch.bfloat16)
    quantized.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, bnb_quantized=True,
                                         quant_storage=torch.bfloat16, module=quantized)
    model = nn.Sequential(nn.Linear(8, 8).bfloat16(), quantized)
    model.register_buffer("inv_freq", torch.ones(4, dtype=torch.bfloat16))
    weight, codes = model[1].weight, packed.clone()
    assert set(fsdp_qlora.packed_4bit_weights(model)) == {id(weight)}
    assert fsdp_qlora.upcast_all_but_4bit(model, torch.float32) is model
    assert model[0].weight.dtype == model.inv_freq.dtype == torch.float32
    assert model[1].weight is weight and torch.equal(weight.data.view(torch.int16), codes.view(torch.int16))
    assert fsdp_qlora.packed_4bit_weights(nn.Sequential(nn.Linear(2, 2))) == {}
