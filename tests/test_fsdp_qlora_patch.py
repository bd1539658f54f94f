"""engines/fsdp_qlora.py: accelerate's FSDP2 mixed-precision upcast leaves bitsandbytes' packed 4-bit weights as they
are. Why: a float32 round trip of bf16-stored codes, as the upcast and FSDP2's bf16 all-gather make it, rewrites every
NaN-shaped pair of bytes (a reference computation below). That the start-up hook replaces accelerate's function, and
what it does to the parameters; on two ranks, that the forward gets the codes loaded, for HeRA and for the stock SFT
twin, is tests/hera/test_hera_recipe_hardware.py::test_the_fsdp2_recipe_trains_with_hera_on_two_ranks."""

from __future__ import annotations

import importlib
import importlib.util
from types import SimpleNamespace

import accelerate.accelerator as accelerator
import accelerate.utils as accelerate_utils
import accelerate.utils.fsdp_utils as fsdp_utils
import pytest
import torch
from torch import nn

from llamafactory_hera.runtime.errors import RecipeError
from llamafactory_hera_patches.engines import fsdp_qlora


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
    """The hook replaced the function where it lives and where ``accelerate.utils`` re-exports it (the Accelerator
    imports it from there), whatever its source says: here accelerate was imported first (this module's head), so the
    patch waits for the process to import LLaMA-Factory, then replaces the copies bound before it too."""
    importlib.import_module("llamafactory.extras.constants")
    patched = fsdp_utils.fsdp2_prepare_model
    assert patched.__code__.co_qualname == "apply.<locals>.fsdp2_prepare_model"  # __qualname__ is the wrapped one's
    assert accelerate_utils.fsdp2_prepare_model is accelerator.fsdp2_prepare_model is patched


def _fsdp_utils(tmp_path, body: str):
    """A stand-in ``accelerate.utils.fsdp_utils`` whose ``fsdp2_prepare_model(accelerator, model)`` runs ``body``."""
    path = tmp_path / "fsdp_utils_copy.py"
    path.write_text(f"import torch\n\n\ndef fsdp2_prepare_model(accelerator, model):\n{body}    return model\n",
                    encoding="utf-8")
    spec = importlib.util.spec_from_file_location("fsdp_utils_copy", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _accelerator(param_dtype: torch.dtype | None) -> SimpleNamespace:
    policy = SimpleNamespace(param_dtype=param_dtype)
    return SimpleNamespace(state=SimpleNamespace(fsdp_plugin=SimpleNamespace(mixed_precision_policy=policy)))


def _model(*storages: torch.dtype) -> nn.Module:
    """A bf16 Linear, a bitsandbytes 4-bit layer for each of ``storages`` (its codes stored as that dtype), and a bf16
    buffer."""
    bnb = pytest.importorskip("bitsandbytes")
    layers = []
    for storage in storages:
        packed, state = _codes(storage, rows=64)
        layers.append(bnb.nn.Linear4bit(512, 64, bias=False, compute_dtype=torch.bfloat16, quant_storage=storage))
        layers[-1].weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, bnb_quantized=True,
                                              quant_storage=storage, module=layers[-1])
    model = nn.Sequential(nn.Linear(8, 8).bfloat16(), *layers)
    model.register_buffer("inv_freq", torch.ones(4, dtype=torch.bfloat16))
    return model


@pytest.mark.parametrize("body", ["", "    model = model.float()\n", "    model.to(dtype=torch.float32)\n",
                                  "    model = model.to('cpu', torch.float32)\n"],
                         ids=["no_upcast", "float", "to_dtype", "to_device_and_dtype"])
def test_any_conversion_keeps_the_codes(tmp_path, body: str) -> None:
    """Whatever statement accelerate converts the model with (or none), the function is wrapped and the 4-bit weight
    keeps its codes, the very tensor it was; every other floating tensor is converted; the first forward passes the
    check of its codes."""
    module = _fsdp_utils(tmp_path, body)
    fsdp_qlora.apply(module)
    model = _model(torch.bfloat16)
    weight = model[1].weight
    codes = weight.data.clone()
    assert module.fsdp2_prepare_model(_accelerator(torch.bfloat16), model) is model and "_apply" not in vars(model)
    assert model[1].weight is weight and torch.equal(weight.data.view(torch.int16), codes.view(torch.int16))
    assert model[0].weight.dtype == (torch.float32 if body else torch.bfloat16)
    model[1](torch.randn(2, 512, dtype=torch.bfloat16))
    assert not model[1]._forward_pre_hooks  # checked once
    weight.untyped_storage().resize_(0)  # as FSDP2 frees an unsharded weight after the forward: the check let it be


@pytest.mark.parametrize("layer", [1, 2])
def test_codes_changed_by_another_path_are_refused_at_the_first_forward(tmp_path, layer: int) -> None:
    """A preparation that rewrites the codes in place through a float32 round trip (no dtype change, so no guard sees
    it), of the first 4-bit layer or of the second: that layer's first forward refuses it by name."""
    module = _fsdp_utils(tmp_path, f"    model[{layer}].weight.data.copy_(model[{layer}].weight.data.float()"
                                   ".bfloat16())\n")
    fsdp_qlora.apply(module)
    model = module.fsdp2_prepare_model(_accelerator(torch.bfloat16), _model(torch.bfloat16, torch.bfloat16))
    model[3 - layer](torch.randn(2, 512, dtype=torch.bfloat16))  # the other one's codes are those loaded
    with pytest.raises(RecipeError, match=f"the codes of {layer} at its first forward are not those loaded"):
        model[layer](torch.randn(2, 512, dtype=torch.bfloat16))


def test_the_upcast_converts_all_but_the_4bit_weights(tmp_path) -> None:
    """accelerate's upcast statement (``model.to(torch.float32)``) in a stand-in ``fsdp2_prepare_model``, patched:
    the Linear and the buffer in float32, the 4-bit weight the very tensor it was, its codes unchanged, and the
    instance ``_apply`` gone afterwards; a model without a 4-bit layer goes through the original. Unpatched, the 4-bit
    weight is upcast with the rest."""
    module = _fsdp_utils(tmp_path, "    model = model.to(torch.float32)\n")
    original = module.fsdp2_prepare_model
    fsdp_qlora.apply(module)
    model = _model(torch.bfloat16)
    weight = model[1].weight
    codes = weight.data.clone()
    assert set(fsdp_qlora.packed_4bit_weights(model)) == {id(weight)}
    assert module.fsdp2_prepare_model(_accelerator(torch.bfloat16), model) is model
    assert model[0].weight.dtype == model.inv_freq.dtype == torch.float32 and "_apply" not in vars(model)
    assert model[1].weight is weight and torch.equal(weight.data.view(torch.int16), codes.view(torch.int16))
    assert original(_accelerator(torch.bfloat16), _model(torch.bfloat16))[1].weight.dtype == torch.float32
    plain = nn.Sequential(nn.Linear(2, 2).bfloat16())
    assert fsdp_qlora.packed_4bit_weights(plain) == {}
    assert module.fsdp2_prepare_model(_accelerator(None), plain)[0].weight.dtype == torch.float32


def test_codes_the_all_gather_would_convert_are_refused(tmp_path) -> None:
    """Codes stored as fp16 (a recipe without ``bf16: true``: LLaMA-Factory's compute dtype) under ``mixed_precision:
    bf16``: FSDP2's bf16 all-gather would convert them as numbers, every one; refused with the fix. Without mixed
    precision they are left as they are."""
    module = _fsdp_utils(tmp_path, "    model = model.to(torch.float32)\n")
    fsdp_qlora.apply(module)
    with pytest.raises(RecipeError, match="the codes are stored as torch.float16 and the accelerate config's mixed "
                                          "precision gathers them as torch.bfloat16, .*set the recipe's bf16: true or "
                                          "fp16: true to match torch.bfloat16"):
        module.fsdp2_prepare_model(_accelerator(torch.bfloat16), _model(torch.float16))
    with pytest.raises(RecipeError, match="the codes are stored as torch.float16"):  # after a layer that is right
        module.fsdp2_prepare_model(_accelerator(torch.bfloat16), _model(torch.bfloat16, torch.float16))
    assert module.fsdp2_prepare_model(_accelerator(None), _model(torch.float16))[1].weight.dtype == torch.float16


@pytest.mark.parametrize(("mixed_precision", "refused"), [("bf16", True), ("fp16", False), ("no", False)])
def test_the_check_reads_accelerates_own_plugin(tmp_path, mixed_precision: str, refused: bool) -> None:
    """The mixed precision as accelerate's FSDP2 plugin holds it (what ``accelerate launch`` with the config's
    ``mixed_precision`` makes; None for "no"), for fp16-stored codes: only a bf16 all-gather is refused."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    if mixed_precision != "no":
        plugin.set_mixed_precision(mixed_precision)
    accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin))
    module = _fsdp_utils(tmp_path, "    model = model.to(torch.float32)\n")
    fsdp_qlora.apply(module)
    if refused:
        with pytest.raises(RecipeError, match="gathers them as torch.bfloat16"):
            module.fsdp2_prepare_model(accelerator, _model(torch.float16))
    else:
        assert module.fsdp2_prepare_model(accelerator, _model(torch.float16))[1].weight.dtype == torch.float16


def test_the_codes_checksum_is_the_byte_sums_of_a_loop_and_sees_one_byte_moved() -> None:
    """checksum against a brute-force loop over the bytes (sum, and sum weighted by 1-based position), the same for
    any chunk size and storage dtype of the same bytes; a changed byte and two swapped bytes change it."""
    codes = torch.randint(0, 256, (37, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    data = codes.flatten().tolist()
    expected = (sum(data), sum((i + 1) * b for i, b in enumerate(data)))
    for chunk in (1, 7, 1 << 24):
        assert fsdp_qlora.checksum(codes, chunk=chunk) == expected
    assert fsdp_qlora.checksum(codes.view(-1)[:184].view(torch.bfloat16)) == fsdp_qlora.checksum(codes.view(-1)[:184])
    moved, swapped = codes.clone().view(-1), codes.clone().view(-1)
    moved[11] ^= 1
    swapped[[3, 4]] = torch.tensor([data[4], data[3]], dtype=torch.uint8)
    assert fsdp_qlora.checksum(moved) != expected
    assert data[3] == data[4] or fsdp_qlora.checksum(swapped) != expected


def test_the_copies_accelerate_bound_before_the_patch_are_replaced_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """A program that imported accelerate before LLaMA-Factory: accelerate.utils and accelerate.accelerator hold their
    own binding of ``fsdp2_prepare_model`` (Accelerator.prepare calls accelerator's); the deferred patch replaces every
    copy that is still the original, so the 4-bit codes keep their guard."""
    from types import ModuleType

    def original(accelerator: object, model: object) -> object:
        return model

    utils = ModuleType("fake_fsdp_utils")
    utils.fsdp2_prepare_model = original
    monkeypatch.setattr(accelerate_utils, "fsdp2_prepare_model", original, raising=False)
    monkeypatch.setattr(accelerator, "fsdp2_prepare_model", original, raising=False)
    fsdp_qlora.apply(utils)
    assert utils.fsdp2_prepare_model is not original
    assert accelerate_utils.fsdp2_prepare_model is utils.fsdp2_prepare_model
    assert accelerator.fsdp2_prepare_model is utils.fsdp2_prepare_model
