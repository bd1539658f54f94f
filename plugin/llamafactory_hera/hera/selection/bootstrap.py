"""Whether a head's MKNN change is real: its resolution and a paired bootstrap interval over the pairs.

A head's MKNN on N pairs with k neighbours is ``sum_i |kNN_head(i) ∩ kNN_teacher(i)| / (N k)``, a multiple of
``1 / (N k)``: the *resolution*, the smallest step a score (and a before/after difference) can move.

The bootstrap resamples the N pairs with replacement and recomputes MKNN on the resampled set, before and after
training with the same resample (so the difference's interval is paired). In a resampled set a pair is never its
own neighbour: copies of the same pair are excluded from each other's neighbours, as the pair itself is in the
full set (else a copy would be every duplicated pair's nearest neighbour in both spaces and inflate the score). A
resample is a multiset: its copies sit in the order of the pairs, so a tie is broken towards the lower pair index
as :func:`~llamafactory_hera.anatomy.metrics.top_k_stable` breaks it in the full set.

Computed without a Gram matrix per resample: the kNN multiset of pair i in a resample with counts ``c`` is the
prefix of i's neighbours in the full set (ranked once, :func:`ranked_prefix`) that holds k copies, so only each
pair's first ``P`` ranked neighbours are kept (``P`` of :func:`prefix_length`, about 4k). A resample in which a
used pair's first ``P`` neighbours hold fewer than k copies (or a pair has fewer than k other copies at all) is
redrawn and counted (with P = 4k + 24 that is below 1e-12 per pair and resample).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llamafactory_hera.anatomy.metrics import top_k_stable

_CHUNK_ELEMENTS = 2**24  # bound on one [resamples, heads, N, P] block (elements)


def resolution(num_pairs: int, k: int) -> float:
    """The smallest step an MKNN score on ``num_pairs`` pairs with ``k`` neighbours can move: ``1 / (N k)``."""
    return 1.0 / (num_pairs * k)


def prefix_length(num_pairs: int, k: int) -> int:
    """How many ranked neighbours of each pair the bootstrap keeps: ``min(N - 1, 4k + 24)``."""
    return min(num_pairs - 1, 4 * k + 24)


def ranked_prefix(ranked: torch.Tensor, prefix: int) -> torch.Tensor:
    """The ``prefix`` nearest neighbours of every row, nearest first, ties towards the lower index.

    Args:
        ranked: ``[..., N, N]`` similarities with the diagonal at ``-inf`` (what ``gram_knn`` ranks).
        prefix: neighbours kept per row, ``1 <= prefix <= N - 1``.

    Returns:
        ``[..., N, prefix]`` int32 indices; the first k are the set ``top_k_stable(ranked, k)`` holds.
    """
    chosen = top_k_stable(ranked, prefix).sort(dim=-1).values  # the prefix set, in index order
    order = ranked.gather(-1, chosen).sort(dim=-1, descending=True, stable=True).indices
    return chosen.gather(-1, order).to(torch.int32)


def draw_resamples(num_pairs: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``[count, num_pairs]`` int64 pair indices drawn with replacement (CPU), each row sorted."""
    return torch.randint(num_pairs, (count, num_pairs), generator=generator).sort(dim=-1).values


def resample_counts(indices: torch.Tensor, num_pairs: int) -> torch.Tensor:
    """``[R, num_pairs]`` float32 copies of each pair in each resample ``indices`` ``[R, n]``."""
    counts = torch.zeros(indices.shape[0], num_pairs, dtype=torch.float32, device=indices.device)
    return counts.scatter_add_(1, indices, torch.ones_like(indices, dtype=torch.float32))


def _taken(counts: torch.Tensor, order: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of each ranked neighbour in the kNN multiset, and whether k copies were found.

    Args:
        counts: ``[R, N]`` copies per pair.
        order: ``[..., N, P]`` int64 ranked neighbours.

    Returns:
        (``[R, ..., N, P]`` copies taken, ``[R, ..., N]`` bool: the prefix held k copies).
    """
    copies = counts[:, order]  # [R, ..., N, P]
    before = copies.cumsum(-1) - copies
    taken = torch.minimum(copies, (k - before).clamp_min(0))
    return taken, taken.sum(-1) >= k


def resampled_scores(head_order: torch.Tensor, teacher_order: torch.Tensor, counts: torch.Tensor,
                     k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MKNN of every head on each resample.

    Args:
        head_order: ``[heads, N, P]`` int32 ranked neighbours of each head (:func:`ranked_prefix`).
        teacher_order: ``[N, P]`` int32 ranked neighbours of the teacher.
        counts: ``[R, N]`` copies of each pair per resample (:func:`resample_counts`), summing to N.
        k: neighbours per sample.

    Returns:
        (``[R, heads]`` float32 scores, ``[R]`` bool: the resample is valid, every used pair found k copies of
        other pairs among its kept neighbours in every space).
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
    heads, prefix = head_order.shape[0], head_order.shape[-1]
    chunk = max(1, _CHUNK_ELEMENTS // max(1, resamples * num * prefix))
    scores = []
    for start in range(0, heads, chunk):
        order = head_order[start:start + chunk].to(counts.device).long()  # [h, N, P]
        taken_h, found = _taken(counts, order, k)  # [R, h, N, P], [R, h, N]
        valid &= (found | ~used.unsqueeze(1)).all(-1).all(-1)
        shared = dense[:, (order + rows).flatten()].reshape(taken_h.shape)  # teacher copies of the same pairs
        overlap = torch.minimum(taken_h, shared).sum(-1)  # [R, h, N]
        scores.append((overlap * counts.unsqueeze(1)).sum(-1) / (num * k))
    return torch.cat(scores, dim=1), valid


@dataclass
class PairedBootstrap:
    """The percentile interval of each head's after - before difference over resampled pairs."""

    low: torch.Tensor  # [heads] lower bound
    high: torch.Tensor  # [heads] upper bound
    deltas: torch.Tensor  # [resamples, heads] after - before on each kept resample
    resamples: int
    redrawn: int  # resamples replaced by a further draw (see the module doc)
    confidence: float
    seed: int


def paired_bootstrap(before_order: torch.Tensor, after_order: torch.Tensor, teacher_order: torch.Tensor, k: int,
                     resamples: int = 1000, seed: int = 0, confidence: float = 0.95, batch: int | None = None,
                     device: torch.device | str = "cpu") -> PairedBootstrap:
    """Percentile bootstrap interval of ``after - before`` MKNN per head, the same resample for both.

    Args:
        before_order, after_order: ``[heads, N, P]`` ranked neighbours of every head before and after training.
        teacher_order: ``[N, P]`` ranked neighbours of the teacher (the same for both).
        k: neighbours per sample.
        resamples: resamples kept (default 1000).
        seed: seeds the CPU generator that draws them (the interval is the same on any device).
        confidence: the interval's coverage (0.95: the 2.5 and 97.5 percentiles).
        batch: resamples scored together (memory: ``batch * N^2`` floats and ``batch * heads * N * P`` elements in
            chunks of heads); default: as many as keep one block near ``2**24`` elements (all 1000 at once for a few
            dozen heads and pairs, where per-call overhead would dominate).
        device: where to score.
    """
    num = teacher_order.shape[0]
    if batch is None:
        per_resample = num * num + before_order.shape[0] * num * before_order.shape[-1]
        batch = max(1, min(resamples, _CHUNK_ELEMENTS // per_resample))
    from tqdm.auto import tqdm

    from llamafactory_hera.anatomy.host_output import progress_file

    generator = torch.Generator().manual_seed(seed)
    kept: list[torch.Tensor] = []
    total = redrawn = 0
    bar = tqdm(total=resamples, desc=f"bootstrap ({before_order.shape[0]} heads x {num} pairs)", unit="resample",
               file=progress_file(), disable=resamples <= batch, leave=False)  # one batch: a blink, no bar
    while total < resamples:
        counts = resample_counts(draw_resamples(num, min(batch, resamples - total), generator), num).to(device)
        before, valid_before = resampled_scores(before_order, teacher_order, counts, k)
        after, valid_after = resampled_scores(after_order, teacher_order, counts, k)
        valid = (valid_before & valid_after).cpu()
        redrawn += int((~valid).sum())
        kept.append((after - before).cpu()[valid])
        total += int(valid.sum())
        bar.update(min(int(valid.sum()), resamples - bar.n))
        if redrawn > 10 * resamples:
            raise RuntimeError(f"bootstrap: {redrawn} resamples of {num} pairs could not be scored with k={k}; "
                               "score on more pairs or with a smaller k")
    bar.close()
    deltas = torch.cat(kept)[:resamples]
    tail = (1.0 - confidence) / 2
    bounds = torch.quantile(deltas.double(), torch.tensor([tail, 1.0 - tail], dtype=torch.float64), dim=0)
    return PairedBootstrap(low=bounds[0].float(), high=bounds[1].float(), deltas=deltas, resamples=len(deltas),
                           redrawn=redrawn, confidence=confidence, seed=seed)


def within_noise(delta: torch.Tensor, low: torch.Tensor, high: torch.Tensor, step: float) -> torch.Tensor:
    """``[...]`` bool: the difference is within noise, its interval contains 0 or it is smaller than one ``step``."""
    return ((low <= 0) & (high >= 0)) | (delta.abs() < step * (1 - 1e-6))
