"""Head scores against an independent brute-force PRH mutual kNN: explicit d-wide head representations, PRH's
outlier clamp by sorting, cosine similarities, neighbour lists by an explicit sort (ties: lower index first) and
Python set intersections. Shares no helper with the code under test."""

from __future__ import annotations

import math

import pytest
import torch

from llamafactory_hera.hera.selection.scores import all_head_neighbours


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _prh_clamp(rows: list[list[float]], q: float) -> list[list[float]]:
    """PRH ``remove_outliers`` (default, non-exact mode): t = mean over samples of each sample's q-quantile of |x|."""
    if q <= 0 or q >= 1:
        return rows
    threshold = sum(_quantile([abs(v) for v in row], q) for row in rows) / len(rows)
    return [[max(-threshold, min(threshold, v)) for v in row] for row in rows]


def _neighbours(rows: list[list[float]], k: int) -> list[set[int]]:
    feats = torch.tensor(rows, dtype=torch.float64)
    unit = feats / feats.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    sims = (unit @ unit.T).tolist()
    out = []
    for i, row in enumerate(sims):
        order = sorted((j for j in range(len(rows)) if j != i), key=lambda j: (-row[j], j))
        out.append(set(order[:k]))
    return out


def brute_mknn(a: list[list[float]], b: list[list[float]], k: int, q: float) -> float:
    na, nb = _neighbours(_prh_clamp(a, q), k), _neighbours(_prh_clamp(b, q), k)
    return sum(len(x & y) / k for x, y in zip(na, nb, strict=True)) / len(a)


def _check(pooled, weights, teacher, k: int, head_dim: int, clamp: float, abs_tol: float = 1e-6) -> torch.Tensor:
    got = all_head_neighbours(pooled, weights, teacher, k, head_dim, clamp=clamp).scores
    heads = pooled[0].shape[1] // head_dim
    for layer in range(len(pooled)):
        for head in range(heads):
            p = pooled[layer][:, head * head_dim:(head + 1) * head_dim].double()
            w = weights[layer][:, head * head_dim:(head + 1) * head_dim].double()
            explicit = (p @ w.T).tolist()  # [N, d]: the head's contribution to the residual stream
            want = brute_mknn(explicit, teacher.double().tolist(), k, clamp)
            assert float(got[layer, head]) == pytest.approx(want, abs=abs_tol), (layer, head)
    return got


@pytest.mark.parametrize("clamp", [0.0, 0.95])
def test_scores_equal_brute_force_prh(clamp: float) -> None:
    gen = torch.Generator().manual_seed(3)
    pooled = [torch.randn(40, 3 * 8, generator=gen) for _ in range(2)]
    weights = [torch.randn(24, 3 * 8, generator=gen) for _ in range(2)]
    teacher = torch.randn(40, 7, generator=gen)
    teacher[:, 0] *= 30  # an outlier dimension, as DINOv2 [CLS] features have
    _check(pooled, weights, teacher, 5, 8, clamp)


def test_the_clamp_changes_which_heads_score_lowest_when_features_have_outlier_dimensions() -> None:
    gen = torch.Generator().manual_seed(5)
    pooled = [torch.randn(60, 6 * 4, generator=gen) for _ in range(2)]
    weights = [torch.randn(16, 6 * 4, generator=gen) for _ in range(2)]
    for w in weights:
        w[0] *= 40  # one residual dimension dominates every head's contribution
    teacher = torch.randn(60, 8, generator=gen)
    teacher[:, :2] *= 25
    clamped = _check(pooled, weights, teacher, 5, 4, 0.95)
    plain = all_head_neighbours(pooled, weights, teacher, 5, 4, clamp=0.0).scores
    assert not torch.equal(clamped, plain)


def test_ties_from_duplicate_samples_follow_the_index_rule() -> None:
    """Duplicated rows (as repeated captions and reused images give) make exact ties at the k-th place."""
    gen = torch.Generator().manual_seed(7)
    pooled = [torch.randn(12, 2 * 4, generator=gen).repeat(3, 1)]  # every sample three times
    weights = [torch.randn(10, 2 * 4, generator=gen)]
    teacher = torch.randn(12, 5, generator=gen).repeat(3, 1)
    _check(pooled, weights, teacher, 4, 4, 0.0)
    _check(pooled, weights, teacher, 4, 4, 0.95)


def test_bf16_inputs_and_many_samples() -> None:
    gen = torch.Generator().manual_seed(11)
    num = 512
    pooled = [torch.randn(num, 2 * 4, generator=gen).bfloat16()]
    weights = [torch.randn(12, 2 * 4, generator=gen).bfloat16()]
    teacher = torch.randn(num, 6, generator=gen).bfloat16()
    # at N=512 a near-tie may flip between float32 (code) and float64 (reference): allow 1 neighbour in the mean
    _check(pooled, weights, teacher, 10, 4, 0.95, abs_tol=1.0 / (num * 10) + 1e-6)
