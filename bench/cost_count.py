"""The bench's additions to the package's step counter (llamafactory_hera.plan.counter, which ``llamafactory-hera
plan`` uses at one rank): a fake process group of any world size (``torch.testing._internal.distributed.fake_pg``),
the bytes each c10d collective moves, and the storages FSDP2 resizes in place re-read at each collective."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.testing._internal.distributed.fake_pg import FakeStore

from llamafactory_hera.plan.counter import StepCounter, tensors_of

COLLECTIVES = {"allgather": "all-gather", "all_gather": "all-gather", "reduce_scatter": "reduce-scatter",
               "allreduce": "all-reduce", "all_reduce": "all-reduce"}


class CollectiveCounter(StepCounter):
    """:class:`StepCounter` plus ``collectives`` and ``calls``: bytes and calls per kind of collective."""

    def __init__(self, exclude: list[torch.Tensor] = ()) -> None:
        super().__init__(exclude)
        self.collectives: dict[str, int] = {}
        self.calls: dict[str, int] = {}

    def _refresh(self) -> None:
        """Re-read every storage's size (FSDP2 resizes the unsharded parameters' storages in place)."""
        total = 0
        for key, (ref, _) in list(self._live.items()):
            storage = ref()
            size = storage.nbytes() if storage is not None else 0
            self._live[key] = (ref, size)
            total += size
        self._total = total

    def mark(self) -> None:
        self._refresh()
        super().mark()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        name = func._opname
        kind = next((label for key, label in COLLECTIVES.items() if key in name), None)
        if kind is not None and func.namespace in ("c10d", "_c10d_functional"):
            if func.namespace == "_c10d_functional":  # (input, ...) -> output
                moved = tensors_of(out) if kind == "all-gather" else tensors_of(args[0])
            else:  # c10d: (outputs, inputs, ...) in place; all-reduce: (tensors, ...)
                moved = tensors_of(args[1] if kind == "reduce-scatter" else args[0])
            self.collectives[kind] = self.collectives.get(kind, 0) + sum(t.numel() * t.element_size() for t in moved)
            self.calls[kind] = self.calls.get(kind, 0) + 1
            self._refresh()
        self.record(out)
        return out


def fake_world(world_size: int) -> torch.distributed.DeviceMesh | None:
    """A fake process group of ``world_size`` ranks (this process is rank 0) and its 1-D CPU mesh; None for 1."""
    if dist.is_initialized():
        dist.destroy_process_group()
    if world_size == 1:
        return None
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    return init_device_mesh("cpu", (world_size,))


def local_bytes(tensor: torch.Tensor) -> int:
    """Bytes this rank holds of ``tensor`` (a DTensor: its shard)."""
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()
