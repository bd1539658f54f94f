"""HeRA's projection of FSDP2-sharded o_proj weights (hera/projection.py) on two gloo ranks, against a brute-force
reference on the same layer unsharded in each process (plain torch: ``x_h @ W_eff[:, h].T`` with ``W_eff = W + s B A``
or DoRA's ``diag(m / ||W + s B A||_row) (W + s B A)``): the heads' values and every parameter's gradient, averaged over
the ranks as FSDP2 averages (each rank projects its own inputs). And the bytes it all-gathers (a TorchDispatchMode on
the collectives, llamafactory_hera_testing.collectives): o_proj's head columns and the adapter parts, not the whole
weight. Settings: full fine-tuning (W trainable), LoRA, DoRA, each with rows that split evenly over the ranks and
rows that do not (FSDP2 pads the last shard); and LoRA on a bitsandbytes 4-bit W (nf4, double quantization, packed in
bf16 as LLaMA-Factory stores it under FSDP), its reference dequantize_4bit of the unsharded packed weight: 24 rows
shard it into whole rows and blocks (768 bf16 elements, 384 per rank: 1536 codes, 12 rows, 24 blocks of 64), so each
rank dequantizes its own rows and only the columns (bf16) move, bit for bit those of the whole weight; 23 rows do not
(368 elements per rank: 11.5 rows), so the packed weight is gathered whole. Prints one line per setting; exits 1 on a
mismatch. The 4-bit settings run where bitsandbytes is installed.

Usage: torchrun --nproc_per_node 2 tests/hera/fsdp2_column_gather.py
"""

from __future__ import annotations

import copy
import importlib.util
import sys

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from llamafactory_hera.hera.projection import base_weight_columns, head_columns
from llamafactory_hera_testing.collectives import CollectiveBytes
from llamafactory_hera_testing.projection import project_heads

HEADS, HEAD_DIM, RANK, SELECTED = 16, 8, 2, [3, 1]  # 128 inputs: whole 4-bit blocks of 64, 2 heads cost less than W
TOLERANCE = 1e-5


class Holder(nn.Module):
    def __init__(self, rows: int, four_bit: bool) -> None:
        super().__init__()
        self.o_proj = nn.Linear(HEADS * HEAD_DIM, rows)
        if four_bit:  # quantized on the move, its quant_state kept on the layer (module=) as FSDP2 drops the weight's
            import bitsandbytes as bnb

            weight = self.o_proj.weight.detach().bfloat16()
            self.o_proj = bnb.nn.Linear4bit(HEADS * HEAD_DIM, rows, compute_dtype=torch.bfloat16, quant_type="nf4",
                                            compress_statistics=True, quant_storage=torch.bfloat16)
            self.o_proj.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4",
                                                   compress_statistics=True, quant_storage=torch.bfloat16,
                                                   module=self.o_proj)
            self.o_proj.to("cpu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # the layer's own call (tests/hera/zero3_column_gather.py)
        return self.o_proj(x)


def dequantized(base: nn.Module) -> torch.Tensor:
    """``[out, in]`` float32 weight of an unsharded base layer: a 4-bit one dequantized by bitsandbytes whole."""
    if not hasattr(base.weight, "quant_state"):
        return base.weight
    from bitsandbytes.functional import dequantize_4bit

    return dequantize_4bit(base.weight.data, base.weight.quant_state).float()


def reference(o_proj: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``[n, B, d]`` brute force: the effective weight whole, then each selected head's columns."""
    base = getattr(o_proj, "base_layer", o_proj)
    weight = dequantized(base)
    if base is not o_proj:
        full = weight + o_proj.scaling["default"] * o_proj.lora_B["default"].weight @ o_proj.lora_A["default"].weight
        if o_proj.use_dora["default"]:
            norm = torch.linalg.norm(full, dim=1).detach()
            full = (o_proj.lora_magnitude_vector["default"].weight / norm)[:, None] * full
        weight = full
    return torch.stack([x[:, i * HEAD_DIM:(i + 1) * HEAD_DIM] @ weight[:, h * HEAD_DIM:(h + 1) * HEAD_DIM].T
                        for i, h in enumerate(SELECTED)])


def build(setting: str, rows: int) -> nn.Module:
    torch.manual_seed(0)
    model = Holder(rows, setting == "lora4bit")
    if setting != "full":
        model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=4, target_modules=["o_proj"], lora_dropout=0.0,
                                                 init_lora_weights=False, use_dora=setting == "dora"))
    return model


def o_proj_of(model: nn.Module) -> nn.Module:
    return next(module for name, module in model.named_modules() if name.endswith("o_proj"))


def check(setting: str, rows: int, mesh: object, rank: int, world: int) -> bool:
    model = build(setting, rows)
    packed = -(-rows * HEADS * HEAD_DIM // 4 // world) * world  # a 4-bit W's bf16 storage elements, padded
    plain = copy.deepcopy(model)
    fully_shard(o_proj_of(model), mesh=mesh)
    fully_shard(model, mesh=mesh)
    inputs = [torch.randn(3, len(SELECTED) * HEAD_DIM, generator=torch.Generator().manual_seed(r)) for r in
              range(world)]
    target = torch.randn(len(SELECTED), 3, rows, generator=torch.Generator().manual_seed(99))
    with CollectiveBytes() as counted:
        got = project_heads(o_proj_of(model), inputs[rank], SELECTED, HEAD_DIM)
        (got * target).sum().backward()
    want = reference(o_proj_of(plain), inputs[rank])
    for x in inputs:  # FSDP2's gradient: the mean of the ranks' gradients
        ((reference(o_proj_of(plain), x) * target).sum() / world).backward()
    named = dict(plain.named_parameters())
    errors = [(got - want).abs().max().item()]
    if setting == "lora4bit":  # the base's columns bit for bit those of the whole dequantized weight; every head's
        # columns (more bytes in bf16 than the packed weight): the packed weight gathered whole, aligned or not
        for heads, moved in ((SELECTED, 2 * (rows * len(SELECTED) * HEAD_DIM if rows == 24 else packed)),
                             (range(HEADS), 2 * packed)):
            columns = head_columns(list(heads), HEAD_DIM)
            with CollectiveBytes() as read:
                got_columns = base_weight_columns(o_proj_of(model).base_layer, columns)
            exact = torch.equal(got_columns, dequantized(o_proj_of(plain).base_layer)[:, columns])
            errors.append(0.0 if exact and read.gathered() == moved else float("inf"))
    for name, param in model.named_parameters():
        if named[name].grad is None:  # the bias: no head reads it
            errors.append(0.0 if param.grad is None else float("inf"))
        else:
            errors.append((param.grad.full_tensor() - named[name].grad).abs().max().item())
    # what the heads read: W's columns (and A's) for the selected heads, B whole; DoRA also its magnitude, A whole
    # (each rank's row norms) and the norms; every row count padded to a multiple of the ranks, as FSDP2 shards
    # 4-bit: W's columns in bf16 where the shards are whole rows and blocks (24 rows), else its packed bf16 storage
    # whole (4 codes an element, padded to a multiple of the ranks)
    padded, columns = -(-rows // world) * world, len(SELECTED) * HEAD_DIM
    expected = 4 * (padded * columns if setting != "lora4bit" else 0) + (setting == "lora4bit") * 2 * (
        padded * columns if rows == 24 else packed)
    expected += 4 * (setting != "full") * (-(-RANK // world) * world * columns + padded * RANK)
    expected += 4 * (setting == "dora") * (2 * padded + -(-RANK // world) * world * HEADS * HEAD_DIM)
    whole = 2 * packed if setting == "lora4bit" else 4 * rows * HEADS * HEAD_DIM
    ok = max(errors) <= TOLERANCE and counted.gathered() == expected
    print(f"{setting} rows {rows}: error {max(errors):.2e}, gathered {counted.gathered()} bytes (expected "
          f"{expected}, whole W {whole}), {dict(counted.bytes)}: {'ok' if ok else 'FAIL'}", flush=True)
    return ok


def main() -> int:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    four_bit = ("lora4bit",) if importlib.util.find_spec("bitsandbytes") else ()  # not on the oldest stack
    results = [check(setting, rows, mesh, rank, world) for setting in ("full", "lora", "dora", *four_bit)
               for rows in (24, 23)]
    dist.destroy_process_group()
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
