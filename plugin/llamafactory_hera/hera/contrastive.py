"""The contrastive candidate set: the global data-parallel batch (differentiable all-gather) and a feature queue.

- Gathering: every rank's valid samples (student representations with their autograd graph, teacher
  features) are all-gathered; each rank's anchors are its own samples, candidates are everyone's.
  The gather's backward returns each rank the gradient that all ranks' losses put on its samples,
  so the averaged DDP gradient equals a single process's gradient over the concatenated batch.
- Queue: a FIFO of recent teacher features and detached student representations that extends the
  candidates when a contrastive batch is too small for k neighbours (MoCo-style memory). In gather
  mode it is filled with the gathered batch, so every rank holds the same queue.
"""

from __future__ import annotations

from typing import Any

import torch


def distributed() -> bool:
    """True inside an initialised multi-process group."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 1 whose backward sums every rank's gradient for this rank's slice.

    Written out (all_reduce of the whole gradient, then this rank's slice) instead of
    ``torch.distributed.nn.functional.all_gather``, whose gloo backward (all-to-all emulated with
    scatters) returned wrong gradients for strided gradient slices in our checks (torch 2.11).
    """

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        ctx.slice = (rank * tensor.shape[1], (rank + 1) * tensor.shape[1])
        parts = [torch.empty_like(tensor) for _ in range(world)]
        torch.distributed.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad)
        start, end = ctx.slice
        return grad[:, start:end]


def gather_batch(reps: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, list[int]]:
    """All-gather variable-size per-rank batches, keeping the student's autograd graph.

    Args:
        reps: ``[H, n, D]`` this rank's student representations (n may be 0 and may differ across ranks).
        teacher: ``[n, E]`` this rank's teacher features.

    Returns:
        (``[H, N, D]`` all ranks' representations in rank order, ``[N, E]`` teacher features, offset of this
        rank's rows, per-rank sizes).
    """
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    # The one host sync HeRA keeps in a step, under hera_gather only: the gathered batch's shape depends on every
    # rank's anchor count, which only that rank's collator knows; one copy of the world's counts to the host.
    size = torch.tensor([reps.shape[1]], device=reps.device)
    sizes_t = [torch.zeros_like(size) for _ in range(world)]
    torch.distributed.all_gather(sizes_t, size)
    sizes = [int(s) for s in torch.cat(sizes_t).tolist()]
    longest = max(sizes)
    pad = longest - reps.shape[1]
    padded = torch.nn.functional.pad(reps, (0, 0, 0, pad)).contiguous()
    padded_teacher = torch.nn.functional.pad(teacher, (0, 0, 0, pad)).contiguous()
    gathered = _GatherWithGrad.apply(padded)  # [H, world * longest, D], differentiable
    teacher_parts = [torch.zeros_like(padded_teacher) for _ in range(world)]
    torch.distributed.all_gather(teacher_parts, padded_teacher)
    reps_out = torch.cat([gathered[:, r * longest:r * longest + n] for r, n in enumerate(sizes)], dim=1)
    teacher_out = torch.cat([part[:n] for part, n in zip(teacher_parts, sizes, strict=True)])
    return reps_out, teacher_out, sum(sizes[:rank]), sizes


def all_ranks_all(flag: torch.Tensor) -> torch.Tensor:
    """Logical AND of a 0-d bool device tensor over ranks, as a device tensor (no host sync; the flag itself
    outside a process group)."""
    if not distributed():
        return flag
    value = flag.to(torch.int32).reshape(1)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
    return value[0].bool()


class FeatureQueue:
    """FIFO of the most recent ``capacity`` samples: detached student reps ``[H, Q, D]`` and teacher ``[Q, E]``."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.reps: torch.Tensor | None = None
        self.teacher: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.teacher is None else int(self.teacher.shape[0])

    def push(self, reps: torch.Tensor, teacher: torch.Tensor) -> None:
        """Append the newest samples (``[H, n, D]``, ``[n, E]``), dropping the oldest beyond capacity."""
        if self.capacity <= 0 or teacher.shape[0] == 0:
            return
        reps, teacher = reps.detach().float(), teacher.detach().float()
        if self.reps is not None:
            reps, teacher = torch.cat([self.reps, reps], dim=1), torch.cat([self.teacher, teacher])
        self.reps, self.teacher = reps[:, -self.capacity:], teacher[-self.capacity:]

    def state_dict(self) -> dict[str, torch.Tensor | int | None]:
        """Tensors on the CPU, for checkpoints."""
        return {"capacity": self.capacity, "reps": None if self.reps is None else self.reps.cpu(),
                "teacher": None if self.teacher is None else self.teacher.cpu()}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        """Restore from :meth:`state_dict`."""
        self.capacity = int(state["capacity"])
        self.reps = None if state["reps"] is None else state["reps"].to(device)
        self.teacher = None if state["teacher"] is None else state["teacher"].to(device)
