"""HeRA's gather of an FSDP2 shard (hera/projection.py ``whole``, whole and at some columns) with and without FSDP2's
CPU offload, against the same model unsharded: the loss, and the gradient of the gathered weight, which reaches it
twice (through the layer's own forward, reduced by FSDP2, and through the gather, read after the forward as HeRA reads
W_O). One process, one rank.

On a GPU (``--device cuda``, NCCL) the offloaded shard lives in pinned host memory while the mesh is the GPU's:
``whole`` must hand back the weight on the GPU (asserted; the loss multiplies it with GPU tensors), so it moves the
shard there, and the gradient must come back to the host shard: a path no CPU run takes (bench/gpu.sh ``offload`` runs
it on a lent GPU). With one rank the gather itself is no collective (DTensor keeps the local tensor when a mesh
dimension has one chunk): the NCCL gather of a moved shard needs two GPUs. On the CPU (gloo) the same checks run with
nothing moved (tests/hera/test_hera_fsdp2.py runs it there). Prints one line per setting; exits 1 on a mismatch.

Usage: python tests/hera/fsdp2_offload_gather.py [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

from llamafactory_hera.hera.projection import whole

TOLERANCE = 1e-5  # float32, the same operations in another order (FSDP2's reduce-scatter, the gather's backward)


def _loss(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, read: Callable[[torch.Tensor], torch.Tensor]
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, the weight read): the layers' forward, then a term on the last layer's weight read after it, outside
    its forward, as HeRA reads W_O after the language model's forward (``read``: ``whole`` under FSDP2)."""
    output = model(x)
    weight = read(model[2].weight)
    return output.square().mean() + (weight @ y[: weight.shape[1]]).square().mean(), weight


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    device = torch.device(parser.parse_args().device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    if device.type == "cuda":
        torch.cuda.set_device(0)
    mesh = init_device_mesh(device.type, (1,))
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 16)).to(device)
    x, y = torch.randn(8, 16, device=device), torch.randn(24, 5, device=device)
    references = {}
    for name, read in (("whole", lambda weight: weight), ("columns", lambda weight: weight[:, [3, 5, 6, 17]])):
        reference.zero_grad(set_to_none=True)
        loss = _loss(reference, x, y, read)[0]
        loss.backward()
        references[name] = loss.item(), reference[2].weight.grad.clone()
    failures = 0
    columns = torch.tensor([3, 5, 6, 17], device=device)  # the gather of some columns only (a head's), as HeRA's
    for offload, name, read in ((False, "whole", whole), (True, "whole", whole),
                                (False, "columns", lambda w: whole(w, columns)),
                                (True, "columns", lambda w: whole(w, columns))):
        model = copy.deepcopy(reference)
        model.zero_grad(set_to_none=True)
        policy = CPUOffloadPolicy(pin_memory=device.type == "cuda") if offload else OffloadPolicy()
        fully_shard(model[2], mesh=mesh, offload_policy=policy)
        fully_shard(model, mesh=mesh, offload_policy=policy)
        loss, gathered = _loss(model, x, y, read)
        weight = model[2].weight  # the sharded parameter (FSDP2 reshards a non-root module after its forward)
        offloaded = all(param.offload_to_cpu for param in model[2]._get_fsdp_state()._fsdp_param_group.fsdp_params)
        loss.backward()
        grad = weight.grad.to(mesh.device_type).full_tensor()  # an offloaded gradient is gathered where the mesh is
        loss_error = abs(loss.item() - references[name][0])
        grad_error = (grad - references[name][1]).abs().max().item()
        ok = (loss_error <= TOLERANCE and grad_error <= TOLERANCE and offloaded == offload
              and gathered.device.type == mesh.device_type and weight.grad.device.type == weight.device.type)
        failures += not ok
        print(f"{name}, offload {offload}: offloaded {offloaded}, shard on {weight.device.type}, gathered on "
              f"{gathered.device.type}, loss error {loss_error:.2e}, gradient error {grad_error:.2e}, gradient on "
              f"{weight.grad.device.type}: {'ok' if ok else 'FAIL'}", flush=True)
    dist.destroy_process_group()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
