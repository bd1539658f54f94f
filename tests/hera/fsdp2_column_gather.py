"""HeRA's projection of FSDP2-sharded o_proj weights (hera/projection.py) on two gloo ranks, against a brute-force
reference on the same layer unsharded in each process (plain torch: ``x_h @ W_eff[:, h].T`` with ``W_eff = W + s B A``
or DoRA's ``diag(m / ||W + s B A||_row) (W + s B A)``): the heads' values and every parameter's gradient, averaged over
the ranks as FSDP2 averages (each rank projects its own inputs). And the bytes it all-gathers (a TorchDispatchMode on
the collectives, llamafactory_hera_testing.collectives): o_proj's head columns and the adapter parts, not the whole
weight. Settings: full fine-tuning (W trainable), LoRA, DoRA, each with rows that split evenly over the ranks and
rows that do not (FSDP2 pads the last shard). Prints one line per setting; exits 1 on a mismatch.

Usage: torchrun --nproc_per_node 2 tests/hera/fsdp2_column_gather.py
"""

from __future__ import annotations

import copy
import sys

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from llamafactory_hera.hera.projection import project_heads
from llamafactory_hera_testing.collectives import CollectiveBytes

HEADS, HEAD_DIM, RANK, SELECTED = 4, 8, 2, [3, 1]
TOLERANCE = 1e-5


class Holder(nn.Module):
    def __init__(self, rows: int) -> None:
        super().__init__()
        self.o_proj = nn.Linear(HEADS * HEAD_DIM, rows)


def reference(o_proj: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``[n, B, d]`` brute force: the effective weight whole, then each selected head's columns."""
    base = getattr(o_proj, "base_layer", o_proj)
    weight = base.weight
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
    model = Holder(rows)
    if setting != "full":
        model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=4, target_modules=["o_proj"], lora_dropout=0.0,
                                                 init_lora_weights=False, use_dora=setting == "dora"))
    return model


def o_proj_of(model: nn.Module) -> nn.Module:
    return next(module for name, module in model.named_modules() if name.endswith("o_proj"))


def check(setting: str, rows: int, mesh: object, rank: int, world: int) -> bool:
    model = build(setting, rows)
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
    for name, param in model.named_parameters():
        if named[name].grad is None:  # the bias: no head reads it
            errors.append(0.0 if param.grad is None else float("inf"))
        else:
            errors.append((param.grad.full_tensor() - named[name].grad).abs().max().item())
    # what the heads read: W's columns (and A's) for the selected heads, B whole; DoRA also its magnitude, A whole
    # (each rank's row norms) and the norms; every row count padded to a multiple of the ranks, as FSDP2 shards
    padded, columns = -(-rows // world) * world, len(SELECTED) * HEAD_DIM
    expected = padded * columns + (setting != "full") * (-(-RANK // world) * world * columns + padded * RANK)
    expected += (setting == "dora") * (2 * padded + -(-RANK // world) * world * HEADS * HEAD_DIM)
    ok = max(errors) <= TOLERANCE and counted.gathered() == 4 * expected
    print(f"{setting} rows {rows}: error {max(errors):.2e}, gathered {counted.gathered()} bytes (expected "
          f"{4 * expected}, whole W {4 * rows * HEADS * HEAD_DIM}), {dict(counted.bytes)}: {'ok' if ok else 'FAIL'}",
          flush=True)
    return ok


def main() -> int:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    results = [check(setting, rows, mesh, rank, world) for setting in ("full", "lora", "dora") for rows in (24, 23)]
    dist.destroy_process_group()
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
