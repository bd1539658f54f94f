"""Batched head scores equal mutual_knn applied head by head to explicitly materialised contributions."""

from __future__ import annotations

import pytest
import torch

from llamafactory_hera.hera.metrics import mutual_knn
from llamafactory_hera.hera.selection.scores import all_head_neighbours, layer_head_neighbours


def test_gram_ranking_matches_explicit_knn() -> None:
    from llamafactory_hera.hera.metrics import knn_indices, top_k_stable
    from llamafactory_hera.hera.selection.scores import ranked_similarity

    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(3, 20, 6, generator=gen)
    assert torch.equal(top_k_stable(ranked_similarity(feats @ feats.transpose(-1, -2)), 4), knn_indices(feats, 4))


@pytest.mark.parametrize("heads,head_dim,d", [(4, 8, 24), (3, 16, 10)])
def test_all_head_neighbours_scores_equal_per_head_mutual_knn(heads: int, head_dim: int, d: int) -> None:
    gen = torch.Generator().manual_seed(heads)
    num, layers, k = 40, 2, 5
    pooled = [torch.randn(num, heads * head_dim, generator=gen) for _ in range(layers)]
    weights = [torch.randn(d, heads * head_dim, generator=gen) for _ in range(layers)]
    teacher = torch.randn(num, 7, generator=gen)
    got = all_head_neighbours(pooled, weights, teacher, k, head_dim).scores
    assert got.shape == (layers, heads)
    for layer in range(layers):
        for head in range(heads):
            cols = slice(head * head_dim, (head + 1) * head_dim)
            explicit = pooled[layer][:, cols] @ weights[layer][:, cols].T  # [N, d], the head's contribution
            assert float(got[layer, head]) == pytest.approx(mutual_knn(explicit, teacher, k), abs=1e-6)


def test_chunking_does_not_change_scores() -> None:
    from llamafactory_hera.hera.metrics import knn_indices

    gen = torch.Generator().manual_seed(1)
    pooled, weight = torch.randn(30, 6 * 4, generator=gen), torch.randn(9, 24, generator=gen)
    teacher = torch.randn(30, 5, generator=gen)
    teacher_knn = knn_indices(teacher, 3)
    whole, _ = layer_head_neighbours(pooled, weight, teacher_knn, 3, 4)
    one_at_a_time, _ = layer_head_neighbours(pooled, weight, teacher_knn, 3, 4, max_chunk_elements=30 * 30)
    assert torch.equal(whole, one_at_a_time)
