"""HeRA's gather of an FSDP2 shard (hera/projection.py ``whole``) with and without FSDP2's CPU offload, against the
same model unsharded: the loss, and the gradient of the gathered weight, which reaches it twice (through the layer's
own forward, reduced by FSDP2, and through the gather, as HeRA's term does). One process, one rank.

On a GPU (``--device cuda``, NCCL) the offloaded shard lives in pinned host memory while the mesh is the GPU's, so
``whole`` moves it to the GPU before the gather and its gradient goes back to the host shard: the path no CPU run
takes (bench/gpu.sh ``offload`` runs it on a lent GPU). On the CPU (gloo) the same checks run with nothing moved
(tests/hera/test_hera_fsdp2.py runs it there). Prints one line per setting; exits 1 on a mismatch.

Usage: python tests/hera/fsdp2_offload_gather.py [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import copy
import socket
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

from llamafactory_hera.hera.projection import whole

TOLERANCE = 1e-5  # float32, the same operations in another order (FSDP2's reduce-scatter, the gather's backward)


def _loss(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, gathered: torch.Tensor) -> torch.Tensor:
    """The layers' forward plus a term on the second layer's weight read outside its forward, as HeRA reads W_O."""
    return model(x).square().mean() + (gathered.to(x.device) @ y).square().mean()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    device = torch.device(parser.parse_args().device)
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)
    if device.type == "cuda":
        torch.cuda.set_device(0)
    mesh = init_device_mesh(device.type, (1,))
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 16)).to(device)
    x, y = torch.randn(8, 16, device=device), torch.randn(24, 5, device=device)
    _loss(reference, x, y, reference[2].weight).backward()
    failures = 0
    for offload in (False, True):
        model = copy.deepcopy(reference)
        model.zero_grad(set_to_none=True)
        policy = CPUOffloadPolicy(pin_memory=device.type == "cuda") if offload else OffloadPolicy()
        fully_shard(model[2], mesh=mesh, offload_policy=policy)
        fully_shard(model, mesh=mesh, offload_policy=policy)
        model(x)  # a first forward: FSDP2 lazily sets up its hooks; the shards are sharded again after it
        weight = model[2].weight
        moved = weight.device.type != mesh.device_type  # whole() moves it to the mesh's device first
        loss = _loss(model, x, y, whole(weight))
        loss.backward()
        grad = weight.grad.to(mesh.device_type).full_tensor()  # an offloaded gradient is gathered where the mesh is
        loss_error = abs(loss.item() - _loss(reference, x, y, reference[2].weight).item())
        grad_error = (grad - reference[2].weight.grad).abs().max().item()
        ok = loss_error <= TOLERANCE and grad_error <= TOLERANCE and moved == (offload and device.type == "cuda") \
            and weight.grad.device.type == weight.device.type
        failures += not ok
        print(f"offload {offload}: shard on {weight.device.type}, moved before the gather {moved}, loss error "
              f"{loss_error:.2e}, gradient error {grad_error:.2e}, gradient on {weight.grad.device.type}: "
              f"{'ok' if ok else 'FAIL'}", flush=True)
    dist.destroy_process_group()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
