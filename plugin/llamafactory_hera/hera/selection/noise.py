"""Whether a head's MKNN change is real (``select --report``): its resolution and a paired bootstrap over the pairs.

A head's MKNN on N pairs with k neighbours is ``sum_i |kNN_head(i) ∩ kNN_teacher(i)| / (N k)``, a multiple of
``1 / (N k)``: the *resolution*, the smallest step a score (and a before/after difference) can move. A difference
is *within noise* when its bootstrap interval contains 0 or it is smaller than one step.

The bootstrap resamples the N pairs with replacement and recomputes MKNN on the resampled set, before and after
training with the same resample (so the difference's interval is paired). Copies of the same pair are not each
other's neighbours (as a pair is not its own in the full set), and a tie goes to the lower pair index as in the
full set. No Gram matrix per resample: pair i's kNN multiset in a resample with copies ``c`` is the prefix of its
neighbours in the full set (ranked once, :func:`~llamafactory_hera.hera.selection.scores.ranked_prefix`) that
holds k copies; only the first ``P`` (:func:`prefix_length`, about 4k) are kept, and a resample where a used pair's
first ``P`` hold fewer than k copies is redrawn and counted (below 1e-12 per pair and resample).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from llamafactory_hera.hera.selection.scores import HeadNeighbours

RESAMPLES = 1000
MIN_RESAMPLES = 100  # select --report --bootstrap N: the fewest it takes
CONFIDENCE = 0.95
METHOD = ("paired percentile bootstrap: pairs resampled with replacement, MKNN recomputed on the resampled set before "
          "and after with the same resample (copies of a pair are not each other's neighbours)")
_CHUNK_ELEMENTS = 2**24  # bound on one [resamples, heads, N, P] block (elements)


def resolution(num_pairs: int, k: int) -> float:
    """The smallest step an MKNN score on ``num_pairs`` pairs with ``k`` neighbours can move: ``1 / (N k)``."""
    return 1.0 / (num_pairs * k)


def prefix_length(num_pairs: int, k: int) -> int:
    """How many ranked neighbours of each pair the bootstrap keeps: ``min(N - 1, 4k + 24)``."""
    return min(num_pairs - 1, 4 * k + 24)


def within_noise(delta: Any, low: Any, high: Any, step: float) -> Any:
    """The mark (bool, elementwise): the interval ``[low, high]`` contains 0 or ``|delta|`` is under one ``step``."""
    return ((low <= 0) & (high >= 0)) | (abs(delta) < step * (1 - 1e-6))


def _taken(counts: torch.Tensor, order: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of each ranked neighbour ``order`` ``[..., N, P]`` in the kNN multiset of each resample ``counts``
    ``[R, N]``: (``[R, ..., N, P]`` copies taken, ``[R, ..., N]`` whether the prefix held k copies)."""
    copies = counts[:, order]
    before = copies.cumsum(-1) - copies
    taken = torch.minimum(copies, (k - before).clamp_min(0))
    return taken, taken.sum(-1) >= k


def resampled_scores(head_order: torch.Tensor, teacher_order: torch.Tensor, counts: torch.Tensor,
                     k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MKNN of every head on each resample.

    Args:
        head_order: ``[heads, N, P]`` int32 ranked neighbours of each head.
        teacher_order: ``[N, P]`` int32 ranked neighbours of the teacher.
        counts: ``[R, N]`` float copies of each pair per resample, summing to N.
        k: neighbours per sample.

    Returns:
        (``[R, heads]`` float32 scores, ``[R]`` bool: every used pair found k copies among its kept neighbours).
    """
    resamples, num = counts.shape
    teacher_order = teacher_order.to(counts.device).long()
    taken_t, valid = _taken(counts, teacher_order, k)  # [R, N, P]
    used = counts > 0
    valid = (valid | ~used).all(-1)
    dense = torch.zeros(resamples, num, num, dtype=torch.float32, device=counts.device)
    dense.scatter_(-1, teacher_order.expand(resamples, -1, -1), taken_t)  # [R, N(i), N(j)] teacher copies
    dense = dense.reshape(resamples, num * num)
    rows = torch.arange(num, device=counts.device).unsqueeze(-1) * num  # [N, 1]
    chunk = max(1, _CHUNK_ELEMENTS // max(1, resamples * num * head_order.shape[-1]))
    scores = []
    for start in range(0, head_order.shape[0], chunk):
        order = head_order[start:start + chunk].to(counts.device).long()  # [h, N, P]
        taken_h, found = _taken(counts, order, k)  # [R, h, N, P], [R, h, N]
        valid &= (found | ~used.unsqueeze(1)).all(-1).all(-1)
        shared = dense[:, (order + rows).flatten()].reshape(taken_h.shape)  # teacher copies of the same pairs
        overlap = torch.minimum(taken_h, shared).sum(-1)  # [R, h, N]
        scores.append((overlap * counts.unsqueeze(1)).sum(-1) / (num * k))
    return torch.cat(scores, dim=1), valid


@dataclass
class HeadChange:
    """Before/after MKNN of every head (``[L, H]`` arrays), the interval of the difference and the mark."""

    before: np.ndarray
    after: np.ndarray
    low: np.ndarray  # [L, H] interval of after - before
    high: np.ndarray
    noise: np.ndarray  # [L, H] bool: within noise
    deltas: np.ndarray  # [resamples, L, H] the bootstrap's differences
    resolution: float
    settings: dict[str, Any]  # resamples, redrawn, confidence, seed, method

    @property
    def delta(self) -> np.ndarray:
        """``[L, H]`` after - before."""
        return self.after - self.before


def paired_bootstrap(before: HeadNeighbours, after: HeadNeighbours, k: int, seed: int, resamples: int = RESAMPLES,
                     confidence: float = CONFIDENCE, device: torch.device | str = "cpu",
                     batch: int | None = None) -> HeadChange:
    """Resample the pairs, take each head's percentile interval of ``after - before``, mark the changes within noise.

    ``before`` and ``after`` are scored on the same pairs with ranked neighbours (``prefix`` > 0). The resamples
    are drawn by a CPU generator seeded with ``seed`` (the same numbers on any ``device``), ``batch`` at a time
    (default: as many as keep one block near ``2**24`` elements; batches change no number).
    """
    if before.heads is None or after.heads is None or before.teacher is None:
        raise ValueError("paired_bootstrap needs the ranked neighbours (score with prefix > 0)")
    from tqdm.auto import tqdm

    from llamafactory_hera.hera.host_output import progress_file

    layers, heads, num, prefix = before.heads.shape
    first, second = before.heads.flatten(0, 1), after.heads.flatten(0, 1)
    batch = batch or max(1, min(resamples, _CHUNK_ELEMENTS // (num * num + layers * heads * num * prefix)))
    generator = torch.Generator().manual_seed(seed)
    kept: list[torch.Tensor] = []
    total = redrawn = 0
    bar = tqdm(total=resamples, desc=f"bootstrap ({layers * heads} heads x {num} pairs)", unit="resample",
               file=progress_file(), disable=resamples <= batch, leave=False)  # one batch: a blink, no bar
    while total < resamples:
        picks = torch.randint(num, (min(batch, resamples - total), num), generator=generator).sort(dim=-1).values
        counts = torch.zeros(len(picks), num).scatter_add_(1, picks, torch.ones(picks.shape)).to(device)
        scores_before, valid_before = resampled_scores(first, before.teacher, counts, k)
        scores_after, valid_after = resampled_scores(second, before.teacher, counts, k)
        valid = (valid_before & valid_after).cpu()
        redrawn += int((~valid).sum())
        kept.append((scores_after - scores_before).cpu()[valid])
        total += int(valid.sum())
        bar.update(min(int(valid.sum()), resamples - bar.n))
        if redrawn > 10 * resamples:
            raise RuntimeError(f"bootstrap: {redrawn} resamples of {num} pairs could not be scored with k={k}; "
                               "score on more pairs or with a smaller k")
    bar.close()
    deltas = torch.cat(kept)[:resamples]
    tail = (1.0 - confidence) / 2
    low, high = torch.quantile(deltas.double(), torch.tensor([tail, 1.0 - tail], dtype=torch.float64), dim=0).float()
    low, high = low.reshape(layers, heads), high.reshape(layers, heads)
    step = resolution(num, k)
    noise = within_noise(after.scores - before.scores, low, high, step)
    settings = {"resamples": len(deltas), "redrawn": redrawn, "confidence": confidence, "seed": seed, "method": METHOD}
    return HeadChange(before.scores.numpy(), after.scores.numpy(), low.numpy(), high.numpy(), noise.numpy(),
                      deltas.reshape(-1, layers, heads).numpy(), step, settings)
