"""HeRA's multi-target InfoNCE loss (paper Eq. 4, 8, 9).

For one head and a batch of B image–caption pairs with student representations ``M`` and
teacher features ``t``::

    L_RA(i) = -(1/k) * sum_{j in N_k^t(i)} log( exp(s(M_i, M_j)/tau) / sum_{z != i} exp(s(M_i, M_z)/tau) )

``N_k^t(i)`` are image i's k nearest other batch images in teacher space (cosine). The loss is averaged over the
batch and heads. Why the candidate set and the temperature are as they are: docs/hera-design.md ("The objective",
"Multi-GPU").
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainerCallback
from typing_extensions import override

from llamafactory_hera.training import sections

Similarity = Literal["cosine", "dot"]


# --- the equation (a pure function)


def hera_loss_anchored(
    anchors: torch.Tensor,
    candidates: torch.Tensor,
    anchor_index: torch.Tensor | None,
    anchor_teacher: torch.Tensor,
    candidate_teacher: torch.Tensor,
    k: int,
    temperature: float | torch.Tensor = 0.07,
    similarity: Similarity = "cosine",
) -> torch.Tensor:
    """``[A]`` float32 per-anchor losses (mean over heads and neighbours): positives are the k teacher neighbours among
    the other candidates (``C - 1 >= k``), the softmax over those candidates. With ``candidates == anchors``: Eq. 4.

    ``anchors`` ``[H, A, D]`` (with gradient), ``candidates`` ``[H, C, D]`` (queued ones detached), ``anchor_index``
    ``[A]`` positions among the candidates (-1: absent; None: the first A, in order), ``anchor_teacher`` ``[A, E]``,
    ``candidate_teacher`` ``[C, E]``. Candidates that are the anchors' own tensors are normalised once."""
    num_candidates = candidates.shape[-2]
    if not 1 <= k <= num_candidates - 1:
        raise ValueError(f"k={k} needs 1 <= k <= C-1 with C={num_candidates} candidates")
    if similarity not in ("cosine", "dot"):
        raise ValueError(f"similarity must be 'cosine' or 'dot', got {similarity!r}")
    a = _unit(anchors, similarity == "cosine")
    c = a if candidates is anchors else _unit(candidates, similarity == "cosine")
    # [A, C]: True at each anchor's own column (none for -1); a comparison, not mask indexing (a sync)
    if anchor_index is None:
        self_mask = torch.eye(anchors.shape[-2], num_candidates, dtype=torch.bool, device=a.device)
    else:
        columns = torch.arange(num_candidates, device=a.device)
        self_mask = anchor_index.to(a.device).unsqueeze(-1) == columns
    with torch.no_grad():
        t_a = _unit(anchor_teacher, True)
        t_c = t_a if candidate_teacher is anchor_teacher else _unit(candidate_teacher, True)
        teacher_sim = (t_a @ t_c.T).masked_fill(self_mask, float("-inf"))
        # [A, k]; stable sort: a tie at the k-th place (reused images) goes to the lower index on every device,
        # as top_k_stable's, without its host sync
        neighbours = teacher_sim.sort(dim=-1, descending=True, stable=True).indices[:, :k].contiguous()  # not [A, C]
    logits = (a @ c.transpose(-1, -2) / temperature).masked_fill(self_mask, float("-inf"))  # [H, A, C]
    log_probs = torch.log_softmax(logits, dim=-1)
    picked = log_probs.gather(-1, neighbours.unsqueeze(0).expand(log_probs.shape[0], -1, -1))  # [H, A, k]
    return -picked.mean(dim=(0, 2))


def _unit(x: torch.Tensor, normalise: bool) -> torch.Tensor:
    """``x`` in float32, L2-normalised on the last dim when ``normalise``."""
    x = x.float()
    return F.normalize(x, dim=-1) if normalise else x


# --- the distributed candidate set (gather, queue)


def distributed() -> bool:
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 1; backward sums every rank's gradient for this rank's slice. Not torch's
    ``all_gather`` with gradient: its gloo backward returned wrong gradients for strided slices (torch 2.11)."""

    @staticmethod
    @override
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        world = torch.distributed.get_world_size()
        rank = torch.distributed.get_rank()
        ctx.slice = (rank * tensor.shape[1], (rank + 1) * tensor.shape[1])
        parts = [torch.empty_like(tensor) for _ in range(world)]
        with sections.collective("HeRA's all-gather of the heads' representations"):
            torch.distributed.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=1)

    @staticmethod
    @override
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        with sections.collective("HeRA's all-reduce of the representations' gradients"):
            torch.distributed.all_reduce(grad)
        start, end = ctx.slice
        return grad[:, start:end]


def gather_batch(reps: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, list[int]]:
    """All-gather per-rank batches (n may be 0), keeping the graph: ``reps`` ``[H, n, D]``, ``teacher`` ``[n, E]``
    -> (``[H, N, D]``, ``[N, E]`` in rank order, this rank's offset, per-rank sizes)."""
    world = torch.distributed.get_world_size()
    rank = torch.distributed.get_rank()
    # HeRA's one host sync in a step (hera_gather only): the gathered shape depends on every rank's anchor count.
    size = torch.tensor([reps.shape[1]], device=reps.device)
    sizes_t = [torch.zeros_like(size) for _ in range(world)]
    with sections.collective("HeRA's all-gather of the batch sizes"):
        torch.distributed.all_gather(sizes_t, size)
    sizes = [int(s) for s in torch.cat(sizes_t).tolist()]
    longest = max(sizes)
    pad = longest - reps.shape[1]
    padded = torch.nn.functional.pad(reps, (0, 0, 0, pad)).contiguous()
    padded_teacher = torch.nn.functional.pad(teacher, (0, 0, 0, pad)).contiguous()
    gathered = _GatherWithGrad.apply(padded)  # [H, world * longest, D], differentiable
    teacher_parts = [torch.zeros_like(padded_teacher) for _ in range(world)]
    with sections.collective("HeRA's all-gather of the teacher's features"):
        torch.distributed.all_gather(teacher_parts, padded_teacher)
    reps_out = torch.cat([gathered[:, r * longest : r * longest + n] for r, n in enumerate(sizes)], dim=1)
    teacher_out = torch.cat([part[:n] for part, n in zip(teacher_parts, sizes, strict=True)])
    return reps_out, teacher_out, sum(sizes[:rank]), sizes


def all_ranks_all(flag: torch.Tensor) -> torch.Tensor:
    """AND of a 0-d bool device tensor over ranks, on the device (no host sync; ``flag`` outside a group)."""
    if not distributed():
        return flag
    value = flag.to(torch.int32).reshape(1)
    with sections.collective("HeRA's all-reduce of the batch's finite check"):
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
    return value[0].bool()


class FeatureQueue:
    """FIFO of the last ``capacity`` samples: detached student reps ``[H, Q, D]``, teacher ``[Q, E]``."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.reps: torch.Tensor | None = None
        self.teacher: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.teacher is None else int(self.teacher.shape[0])

    def push(self, reps: torch.Tensor, teacher: torch.Tensor) -> None:
        """Append ``[H, n, D]``, ``[n, E]``, dropping the oldest beyond capacity."""
        if self.capacity <= 0 or teacher.shape[0] == 0:
            return
        reps = reps.detach().float()
        teacher = teacher.detach().float()
        if self.reps is not None:
            reps = torch.cat([self.reps, reps], dim=1)
            teacher = torch.cat([self.teacher, teacher])
        self.reps = reps[:, -self.capacity :]
        self.teacher = teacher[-self.capacity :]

    def state_dict(self) -> dict[str, torch.Tensor | int | None]:
        return {
            "capacity": self.capacity,
            "reps": None if self.reps is None else self.reps.cpu(),
            "teacher": None if self.teacher is None else self.teacher.cpu(),
        }

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        self.capacity = int(state["capacity"])
        self.reps = None if state["reps"] is None else state["reps"].to(device)
        self.teacher = None if state["teacher"] is None else state["teacher"].to(device)


TAU_MIN = 0.01  # CLIP's cap: 1 / tau <= 100
TAU_MAX = 100.0  # symmetric in log space; wide enough for raw dot products (hera_similarity: dot)
LOG_TAU_MIN = math.log(TAU_MIN)
LOG_TAU_MAX = math.log(TAU_MAX)


def used_temperature(log_tau: torch.Tensor) -> torch.Tensor:
    """``exp(log_tau)`` clamped to ``[TAU_MIN, TAU_MAX]`` (0-d, differentiable inside the range)."""
    return log_tau.exp().clamp(TAU_MIN, TAU_MAX)


class TemperatureGradHandler(TrainerCallback):
    """The temperature's gradient (and update, with ``own_optimizer``); it lives outside the model.

    - Before each optimizer step: averages the gradient over ranks (DDP does not see it), zeros where a rank had no
      term, so the collective matches.
    - ``own_optimizer`` (AdamW, set under DeepSpeed or FSDP): stepped with the main lr / ``learning_rate`` factor.
    - After each step: clamps ``log tau`` and clears its gradient (``model.zero_grad()`` does not reach it).
    """

    def __init__(self, log_tau: nn.Parameter, base_lr: float) -> None:
        self.log_tau = log_tau
        self.base_lr = base_lr
        self.own_optimizer: torch.optim.Optimizer | None = None

    @override
    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if self.log_tau.grad is None:
                self.log_tau.grad = torch.zeros_like(self.log_tau)
            with sections.collective("HeRA's all-reduce of the temperature's gradient"):
                torch.distributed.all_reduce(self.log_tau.grad)
            self.log_tau.grad /= torch.distributed.get_world_size()
        if self.own_optimizer is not None and self.log_tau.grad is not None:
            main = kwargs.get("optimizer")
            factor = main.param_groups[0]["lr"] / args.learning_rate if main is not None and args.learning_rate else 1
            for group in self.own_optimizer.param_groups:
                group["lr"] = self.base_lr * factor
            self.own_optimizer.step()

    @override
    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        with torch.no_grad():
            self.log_tau.clamp_(LOG_TAU_MIN, LOG_TAU_MAX)
        self.log_tau.grad = None
