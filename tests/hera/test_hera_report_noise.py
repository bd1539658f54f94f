"""Whether a head's MKNN change is real (``select --report``): the paired bootstrap against an independent brute-force
reference (explicit head representations, cosine similarities in float64, neighbour lists of the resampled set by
an explicit sort with ties to the lower position, Python set intersections), and the within-noise marking on
constructed cases."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from llamafactory_hera.hera.selection.noise import (
    paired_bootstrap,
    prefix_length,
    resampled_scores,
    resolution,
    within_noise,
)
from llamafactory_hera.hera.selection.report import report_fields, summary_rows
from llamafactory_hera.hera.selection.scores import HeadNeighbours, all_head_neighbours, clamp_outliers

LAYERS, HEADS, HEAD_DIM, WIDTH = 2, 3, 4, 12


def _inputs(num: int, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """(pooled, weights before, weights after, teacher) of a random model; 'after' is a perturbed 'before'."""
    gen = torch.Generator().manual_seed(seed)
    pooled = [torch.randn(num, HEADS * HEAD_DIM, generator=gen) for _ in range(LAYERS)]
    before = [torch.randn(WIDTH, HEADS * HEAD_DIM, generator=gen) for _ in range(LAYERS)]
    after = [w + 0.6 * torch.randn(w.shape, generator=gen) for w in before]
    teacher = torch.randn(num, 10, generator=gen)
    return pooled, before, after, teacher


def _draw(num: int, count: int, seed: int) -> list[list[int]]:
    """The resamples the bootstrap draws with ``seed``: ``count`` rows of ``num`` pair indices (with replacement, a
    seeded CPU generator), each row sorted."""
    return torch.randint(num, (count, num), generator=torch.Generator().manual_seed(seed)).sort(dim=-1).values.tolist()


def _cosines(rows: torch.Tensor) -> list[list[float]]:
    unit = rows.double() / rows.double().norm(dim=-1, keepdim=True)
    return (unit @ unit.T).tolist()


def _brute_mknn(head_sims: list[list[float]], teacher_sims: list[list[float]], picks: list[int], k: int) -> float:
    """MKNN of the resampled set ``picks`` (pair indices, one position each): position a's neighbours are the k
    positions b of other pairs (``picks[b] != picks[a]``) most similar to it, ties to the lower position."""

    def neighbours(sims: list[list[float]], a: int) -> set[int]:
        others = [b for b in range(len(picks)) if picks[b] != picks[a]]
        return set(sorted(others, key=lambda b: (-sims[picks[a]][picks[b]], b))[:k])

    shared = sum(len(neighbours(head_sims, a) & neighbours(teacher_sims, a)) for a in range(len(picks)))
    return shared / (len(picks) * k)


def _head_sims(pooled: list[torch.Tensor], weights: list[torch.Tensor], clamp: float) -> list[list[list[float]]]:
    """Every head's cosine similarities of its explicit representations ``[N, d]`` (PRH's clamp over all N pairs)."""
    out = []
    for layer in range(LAYERS):
        for head in range(HEADS):
            cols = slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)
            explicit = pooled[layer][:, cols].double() @ weights[layer][:, cols].double().T
            out.append(_cosines(clamp_outliers(explicit, clamp)))
    return out


@pytest.mark.parametrize("num,k,clamp", [(16, 3, 0.0), (64, 3, 0.95)])  # the second keeps a prefix shorter than N-1
def test_resampled_scores_equal_a_brute_force_mknn_of_the_resampled_pairs(num: int, k: int, clamp: float) -> None:
    pooled, weights, _, teacher = _inputs(num, seed=num)
    prefix = prefix_length(num, k)
    assert prefix == min(num - 1, 4 * k + 24)
    got = all_head_neighbours(pooled, weights, teacher, k, HEAD_DIM, clamp=clamp, prefix=prefix)
    assert got.heads is not None and got.teacher is not None
    assert got.heads.shape == (LAYERS, HEADS, num, prefix) and got.teacher.shape == (num, prefix)
    orders = got.heads.flatten(0, 1)
    head_sims = _head_sims(pooled, weights, clamp)
    teacher_sims = _cosines(clamp_outliers(teacher.double(), clamp))

    # every pair once: the scores themselves
    whole, valid = resampled_scores(orders, got.teacher, torch.ones(1, num), k)
    assert bool(valid.all())
    torch.testing.assert_close(whole[0], got.scores.flatten(), atol=1e-6, rtol=0)

    picks = _draw(num, 6, seed=1)
    counts = torch.tensor([[row.count(pair) for pair in range(num)] for row in picks], dtype=torch.float32)
    scores, valid = resampled_scores(orders, got.teacher, counts, k)
    assert bool(valid.all())
    for r, row in enumerate(picks):
        assert len(set(row)) < num  # a real resample: some pairs twice, some left out
        for h, sims in enumerate(head_sims):
            assert float(scores[r, h]) == pytest.approx(_brute_mknn(sims, teacher_sims, row, k), abs=1e-6), (r, h)


def test_paired_bootstrap_interval_is_the_percentile_of_brute_force_deltas() -> None:
    num, k, resamples, seed = 20, 3, 25, 7
    pooled, before_w, after_w, teacher = _inputs(num, seed=3)
    prefix = prefix_length(num, k)
    before = all_head_neighbours(pooled, before_w, teacher, k, HEAD_DIM, prefix=prefix)
    after = all_head_neighbours(pooled, after_w, teacher, k, HEAD_DIM, prefix=prefix)
    boot = paired_bootstrap(before, after, k, seed, resamples=resamples, batch=resamples)
    assert boot.settings["resamples"] == resamples and boot.settings["redrawn"] == 0
    # the reference draws the same resamples and scores both sides of each with a plain loop
    picks = _draw(num, resamples, seed)
    sims_before, sims_after = _head_sims(pooled, before_w, 0.0), _head_sims(pooled, after_w, 0.0)
    teacher_sims = _cosines(teacher)
    want = np.array([[_brute_mknn(a, teacher_sims, row, k) - _brute_mknn(b, teacher_sims, row, k)
                      for b, a in zip(sims_before, sims_after, strict=True)] for row in picks])
    np.testing.assert_allclose(boot.deltas.reshape(resamples, -1), want, atol=1e-6)
    np.testing.assert_allclose(boot.low.flatten(), np.quantile(want, 0.025, axis=0), atol=1e-6)
    np.testing.assert_allclose(boot.high.flatten(), np.quantile(want, 0.975, axis=0), atol=1e-6)
    again = paired_bootstrap(before, after, k, seed, resamples=resamples, batch=4)  # batches change nothing
    np.testing.assert_array_equal(again.deltas, boot.deltas)


def test_resamples_that_cannot_be_scored_are_redrawn_and_counted() -> None:
    """Four pairs, k = 2: a resample holding a pair three times leaves that pair one other copy, fewer than k."""
    num, k = 4, 2
    pooled, weights, _, teacher = _inputs(num, seed=5)
    got = all_head_neighbours(pooled, weights, teacher, k, HEAD_DIM, prefix=prefix_length(num, k))
    counts = torch.tensor([[3.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    _, valid = resampled_scores(got.heads.flatten(0, 1), got.teacher, counts, k)
    assert valid.tolist() == [False, True]
    boot = paired_bootstrap(got, got, k, seed=0, resamples=200)
    assert boot.settings["resamples"] == 200 and boot.settings["redrawn"] > 0 and float(abs(boot.deltas).max()) == 0.0


def _constructed(num: int = 24, k: int = 3) -> tuple[HeadNeighbours, HeadNeighbours]:
    """Two heads (one layer): head 0 unchanged by training; head 1 random before and the teacher's own neighbours
    after (MKNN 1.0), a change far beyond noise."""
    prefix = prefix_length(num, k)
    gen = torch.Generator().manual_seed(0)
    teacher_feats = torch.randn(num, 6, generator=gen)
    teacher = all_head_neighbours([teacher_feats], [torch.eye(6)], teacher_feats, k, 6, prefix=prefix)
    random_feats = torch.randn(num, 6, generator=gen)
    unchanged = all_head_neighbours([random_feats], [torch.eye(6)], teacher_feats, k, 6, prefix=prefix)
    assert float(teacher.scores[0, 0]) == 1.0 and float(unchanged.scores[0, 0]) < 0.5

    def stack(*heads: HeadNeighbours) -> HeadNeighbours:
        return HeadNeighbours(torch.cat([h.scores for h in heads], dim=1), torch.cat([h.heads for h in heads], dim=1),
                              teacher.teacher)

    return stack(unchanged, unchanged), stack(unchanged, teacher)


def test_changes_within_noise_are_marked_in_rows_json_and_plot(tmp_path: Path) -> None:
    from llamafactory_hera.anatomy.head_plots import plot_before_after

    before, after = _constructed()
    change = paired_bootstrap(before, after, 3, seed=0, resamples=200)
    assert change.resolution == pytest.approx(1 / 72) and change.settings["resamples"] == 200
    assert change.noise.tolist() == [[True, False]]
    assert change.delta[0, 0] == 0 and change.low[0, 1] > 0  # the interval of the real change excludes 0
    rows = summary_rows(change, [(0, 1)])
    assert [(row["head"], row["within_noise"], row["change"]) for row in rows] == [
        ("L0H1", False, "beyond noise"), ("others (1) mean", True, "within noise"),
        ("others: largest drop L0H0", True, "within noise")]
    assert rows[0]["ci"].startswith("[+") and rows[2]["ci"] == "[0.0000, 0.0000]"  # no "-0.0000"
    fields = json.loads(json.dumps(report_fields(change)))
    assert fields["within_noise"] == [[True, False]] and fields["resolution"] == pytest.approx(1 / 72)
    assert fields["delta_ci_low"][0][0] <= 0 <= fields["delta_ci_high"][0][0]
    png = plot_before_after(change.before, change.after, [(0, 1)], tmp_path / "report.png", "constructed",
                            noise=change.noise)
    assert png.stat().st_size > 1000

    # a difference below one step is within noise even when its interval excludes 0
    step = resolution(24, 3)
    marked = within_noise(torch.tensor([0.4 * step, 2 * step, 2 * step]), torch.tensor([0.1 * step, 0.5 * step, -step]),
                          torch.tensor([0.5 * step, 3 * step, 3 * step]), step)
    assert marked.tolist() == [True, False, True]
