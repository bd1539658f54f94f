"""HeRA's per-head split through a bitsandbytes-quantized ``o_proj`` (4-bit nf4 / fp4 / double quantization, 8-bit)
and through DoRA, each against independent references: the layer's own forward (with every other head's input
zeroed, and on the identity for the weight), int8 codes times their row scales, and autograd through that forward."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from llamafactory_hera.hera.projection import base_weight_columns, sharded_columns
from llamafactory_hera_testing.projection import project_heads
from llamafactory_hera_testing.zero3 import project_in_call

bnb = pytest.importorskip("bitsandbytes")

HEADS, HEAD_DIM, WIDTH = 4, 8, 24
STORAGES = ("plain", "nf4", "fp4", "nf4_double", "int8")


class _Attention(nn.Module):
    def __init__(self, o_proj: nn.Module) -> None:
        super().__init__()
        self.o_proj = o_proj


def _o_proj(storage: str, weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    out_features, in_features = weight.shape
    if storage == "plain":
        layer = nn.Linear(in_features, out_features)
        layer.weight.data.copy_(weight)
    elif storage == "int8":
        layer = bnb.nn.Linear8bitLt(in_features, out_features, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False)
    else:
        kind, double = storage.split("_")[0], storage.endswith("double")
        layer = bnb.nn.Linear4bit(in_features, out_features, compute_dtype=torch.float32, quant_type=kind,
                                  compress_statistics=double)
        layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type=kind,
                                         compress_statistics=double)
    layer.bias = nn.Parameter(bias.clone())
    return layer.to("cpu")  # bitsandbytes quantizes on the move


def _layer(storage: str, adapter: str) -> nn.Module:
    torch.manual_seed(0)
    model = _Attention(_o_proj(storage, torch.randn(WIDTH, HEADS * HEAD_DIM) * 0.1, torch.randn(WIDTH) * 0.1))
    if adapter == "none":
        return model.o_proj
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"], lora_dropout=0.0,
                                            init_lora_weights=False, use_dora=adapter == "dora"))
    o_proj = peft.base_model.model.o_proj
    if adapter == "dora":  # a magnitude away from its initial row norm, so that the row scale is not 1
        o_proj.lora_magnitude_vector["default"].weight.data.mul_(torch.linspace(0.5, 1.5, WIDTH))
    return o_proj


def _flat_dequantize_4bit(A: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str, shape: Any,
                          dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' 4-bit layout as its CUDA kernel and its CPU kernel without AVX-512 read it, by brute force: the
    flattened weight's codes (high nibble first), each run of ``blocksize`` codes times its absmax."""
    packed = A.reshape(-1).view(torch.uint8)
    codes = torch.stack([packed >> 4, packed & 15], -1).flatten()[:math.prod(shape)].long()
    table = bnb.functional.get_4bit_type(quant_type, device=A.device)
    return (table[codes] * absmax.float().repeat_interleave(blocksize)[:len(codes)]).to(dtype).reshape(shape)


# native: bitsandbytes' CPU kernel on this machine; on a CPU with AVX-512 it takes row r's blocks from
# r * (in // blocksize), the flattened weight's blocks only where in is a multiple of blocksize. flat: the layout of
# CUDA and of CPUs without AVX-512 (the brute force above in place of the kernel), so that one machine runs both
LAYOUTS = ("native", "flat")


def _use_layout(layout: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if layout == "flat":
        monkeypatch.setattr(torch.ops.bitsandbytes, "dequantize_4bit", SimpleNamespace(default=_flat_dequantize_4bit))


def _alone(x: torch.Tensor, head: int) -> torch.Tensor:
    """``x`` with every head's input but ``head``'s zeroed."""
    mask = torch.zeros(HEADS, HEAD_DIM)
    mask[head] = 1
    return x * mask.flatten()


# 8-bit with DoRA is left out: PEFT 0.18.1 wraps bitsandbytes 0.50's Linear8bitLt in its plain LoRA Linear on CPU,
# whose DoRA forward fails from the second call on (the layer's row scales moved to its state: 'NoneType' object has no
# attribute 'unsqueeze'), in stock SFT as well; hera/raw_checks.py refuses that pair by name
# by_call: the ZeRO-3 path (hera/capture.py InCallColumns: each weight's head columns copied in its module's call,
# DoRA's row norm where PEFT's forward computes it; here nothing is partitioned, so the calls read the same weights)
# flat: one case in the other 4-bit layout (HeRA and the layer read the weight through the same dequantize_4bit)
@pytest.mark.parametrize(("storage", "adapter", "by_call", "layout"),
                         [(s, a, c, "native") for s in STORAGES for a in ("none", "lora", "dora") for c in (False, True)
                          if (s, a) != ("int8", "dora")] + [("nf4_double", "dora", False, "flat")])
def test_heads_through_a_quantized_or_dora_o_proj_equal_the_layers_own_forward(
        storage: str, adapter: str, by_call: bool, layout: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _use_layout(layout, monkeypatch)
    o_proj = _layer(storage, adapter)
    x = torch.randn(3, HEADS * HEAD_DIM, requires_grad=True)
    bias = (o_proj.base_layer if adapter != "none" else o_proj).bias
    heads = list(range(HEADS))
    parts = (project_in_call(o_proj, x, heads, HEAD_DIM)[0] if by_call
             else project_heads(o_proj, x, heads, HEAD_DIM))  # [H, 3, WIDTH]
    with torch.no_grad():
        torch.testing.assert_close(parts.sum(0), o_proj(x) - bias, rtol=0, atol=2e-6)  # heads sum to the layer
        for head in heads:  # each part is one head: the layer's forward with the others' inputs zeroed
            torch.testing.assert_close(parts[head], o_proj(_alone(x, head)) - bias, rtol=0, atol=2e-6)
    # gradients: the same loss through the layer's own forward, head by head, reaches the same tensors
    weights = torch.randn(HEADS, 3, WIDTH)
    trainable = [x, *(p for n, p in o_proj.named_parameters() if "lora_" in n)]
    ours = torch.autograd.grad((parts * weights).sum(), trainable)
    reference = torch.autograd.grad(sum(((o_proj(_alone(x, h)) - bias) * weights[h]).sum() for h in heads),
                                    trainable)
    assert len(trainable) == 1 + {"none": 0, "lora": 2, "dora": 3}[adapter]  # x, lora_A, lora_B (, magnitude)
    for got, want in zip(ours, reference, strict=True):
        assert want.abs().max() > 0  # the gradient reaches the head's input and every adapter tensor
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("storage", "layout"), [*((s, "native") for s in STORAGES),
                                                  *((s, "flat") for s in STORAGES if s not in ("plain", "int8"))])
def test_a_quantized_weight_reads_as_its_dequantized_values(storage: str, layout: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    _use_layout(layout, monkeypatch)
    base = _layer(storage, "none")
    columns = torch.tensor([3, 17, 8, 31])
    with torch.no_grad():  # the forward on the identity: the weight it computes with (+ b - b rounds)
        forward = (base(torch.eye(HEADS * HEAD_DIM)) - base.bias).T
    torch.testing.assert_close(base_weight_columns(base, columns), forward[:, columns], rtol=0, atol=1e-7)
    if storage == "int8":  # W = codes * SCB / 127, and never the codes themselves
        codes, scb = base.weight.data, base.state.SCB  # the first forward moved SCB to the state
        torch.testing.assert_close(base_weight_columns(base), codes.float() * scb[:, None] / 127, rtol=2e-7, atol=0)
        assert base_weight_columns(base).abs().max() < 1
        # in eval mode bitsandbytes 0.50 runs LLM.int8 instead (inputs cast to float16 and quantized per row): that
        # forward is not the weight's product; HeRA trains in train mode, where it is
        x = torch.randn(5, HEADS * HEAD_DIM)
        with torch.no_grad():
            exact = x @ base_weight_columns(base).T
            assert ((base.eval()(x) - base.bias - exact).norm() / exact.norm()) > 1e-3
            torch.testing.assert_close(base.train()(x) - base.bias, exact, rtol=0, atol=1e-6)
    elif storage != "plain":
        dequantized = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state)
        torch.testing.assert_close(base_weight_columns(base, columns), dequantized[:, columns].float(), rtol=0, atol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("storage", ["nf4", "fp4", "nf4_double"])
def test_a_4bit_weight_without_its_quant_state_is_read_with_the_layers(storage: str, layout: str,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """As FSDP2 leaves a 4-bit layer (its weight a DTensor of the bare packed storage, gathered by HeRA;
    tests/hera/test_hera_fsdp2.py): the quantization state is the layer's (bitsandbytes keeps it on ``Linear4bit``,
    whose forward puts it back on the weight). Read as before; never the packed storage as weights."""
    _use_layout(layout, monkeypatch)
    base = _layer(storage, "none")
    want = base_weight_columns(base)
    base.quant_state = base.weight.quant_state
    base.weight = nn.Parameter(base.weight.data.clone(), requires_grad=False)  # the packed storage, bare
    assert getattr(base.weight, "quant_state", None) is None
    torch.testing.assert_close(base_weight_columns(base), want, rtol=0, atol=0)


def test_eval_forwards_keep_the_4bit_layout_the_layer_trains_and_is_read_in() -> None:
    """bitsandbytes (>= 0.50) repacks a 4-bit layer in place for its CPU inference kernel at an eval-mode forward
    without gradient, where the CPU has AVX512-BF16 (the flag it reads at each forward, set here as such a CPU sets it):
    under ``eval_mode`` the layout stays, the forward is the dequantized weight's, the mode comes back, the layer
    trains after it and its columns read as before. Where this CPU has the kernel, the same forward without
    ``eval_mode`` repacks (what the monitor and HARC's directions did to the trained model), and a repacked weight is
    refused by name, never read."""
    from llamafactory_hera.training.eval_forward import eval_mode, keep_4bit_layout

    torch.manual_seed(0)
    weight, bias = torch.randn(64, 64) * 0.1, torch.randn(64) * 0.1  # widths bitsandbytes' CPU repack accepts

    def model_of() -> nn.Module:
        layer = _o_proj("nf4", weight, bias)
        layer.support_avx512bf16_for_cpu = True
        return _Attention(layer)

    model, x = model_of(), torch.randn(3, 64)
    before = base_weight_columns(model.o_proj)
    with eval_mode(model), torch.no_grad():
        assert not model.training
        out = model.o_proj(x)
    assert model.training and not getattr(model.o_proj.weight.quant_state, "packing_format_for_cpu", False)
    assert model.o_proj.support_avx512bf16_for_cpu is False and keep_4bit_layout(model) == 0
    torch.testing.assert_close(out, x @ before.T + bias, rtol=0, atol=1e-5)
    assert torch.equal(base_weight_columns(model.o_proj), before)
    model.o_proj(x.requires_grad_()).sum().backward()  # trains after it (bitsandbytes 0.50.2: fails after a repack)
    assert model.o_proj.bias.grad is not None and x.grad is not None

    repacked = model_of()
    if bnb.functional.has_avx512bf16():  # this CPU runs the repacked kernel: show what eval_mode prevents
        repacked.eval()
        with torch.no_grad():
            repacked.o_proj(torch.randn(3, 64))
    else:  # the repacked layout, as bitsandbytes marks it
        repacked.o_proj.weight.quant_state.packing_format_for_cpu = True
    assert repacked.o_proj.weight.quant_state.packing_format_for_cpu
    with pytest.raises(RuntimeError, match="CPU inference layout"):
        base_weight_columns(repacked.o_proj)


class _Shard:
    """What ``sharded_columns`` reads of an FSDP2 shard (a DTensor ``Shard(0)`` on a 1-D mesh) on rank ``rank`` of
    ``world``: ``torch.chunk``'s piece of the packed storage ``packed`` (the last ones short or empty), the global shape
    and size."""

    def __init__(self, packed: torch.Tensor, rank: int, world: int) -> None:
        chunk = -(-packed.shape[0] // world)
        self.local, self.shape, self.placements = packed[rank * chunk:(rank + 1) * chunk], packed.shape, (Shard(0),)
        self.numel, self.element_size = packed.numel, packed.element_size
        self.device_mesh = SimpleNamespace(ndim=1, size=lambda: world, get_local_rank=lambda: rank, device_type="cpu")

    def to_local(self) -> torch.Tensor:
        return self.local


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("width", "rows", "world", "lengths"),
                         [(64, 47, 24, [2] * 23 + [1]), (48, 63, 16, None), (48, 16, 16, None)])
def test_each_rank_reads_its_4bit_shard_alone_only_where_it_holds_whole_rows_of_whole_blocks(
        width: int, rows: int, world: int, lengths: list[int] | None, layout: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The 4-bit shard rule per rank (decided from global shapes, so one process runs every rank; each rank's
    ``[rows, C]`` handed back where the ranks would all-gather them), against ``dequantize_4bit`` of the whole packed
    weight (nf4, double quantization, bf16 storage: 4 codes an element), in both layouts: 47 rows of 64 on 24 ranks
    are 752 elements, shards of 32 (128 codes: 2 rows, 2 blocks) and a short last one of 16 (1 row, its first block
    the 47th: where a full shard would start it). 48 wide, not a multiple of 64, never (None: the caller gathers the
    weight whole), in every layout: 63 rows on 16 ranks are shards of 4 rows and 3 blocks, but blocks run across
    rows, which the AVX-512 kernel does not read; 16 rows are shards of a whole row, not a whole block."""
    _use_layout(layout, monkeypatch)
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(width, rows, compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True,
                              quant_storage=torch.bfloat16)
    layer.weight = bnb.nn.Params4bit(torch.randn(rows, width, dtype=torch.bfloat16), requires_grad=False,
                                     quant_type="nf4", compress_statistics=True, quant_storage=torch.bfloat16)
    packed, state = layer.to("cpu").weight.data, layer.weight.quant_state
    whole = bnb.functional.dequantize_4bit(packed, state)
    if width % state.blocksize == 0:  # rows of whole blocks: every layout reads the flattened weight's blocks
        absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
        assert torch.equal(whole, _flat_dequantize_4bit(packed, absmax, 64, "nf4", (rows, width), torch.bfloat16))
    columns = torch.arange(8, 16)
    monkeypatch.setattr(DTensor, "from_local", lambda values, *_, **__: SimpleNamespace(full_tensor=lambda: values))
    read = [sharded_columns(_Shard(packed, rank, world), state, columns) for rank in range(world)]
    if lengths is None:
        assert read == [None] * world
        return
    assert [len(part) for part in read] == lengths
    assert torch.equal(torch.cat(read), whole[:, columns])
