"""Whether a head's MKNN change is real (``select --report``): the paired bootstrap against an independent brute-force
reference (explicit head representations, cosine similarities in float64, neighbour sets by an explicit sort with
ties to the lower index, Python set intersections, a plain loop over the resamples and their pairs), and the
within-noise marking on constructed cases."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from llamafactory_hera.hera.selection import noise
from llamafactory_hera.hera.selection.noise import paired_bootstrap, resolution, within_noise
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
    seeded CPU generator)."""
    return torch.randint(num, (count, num), generator=torch.Generator().manual_seed(seed)).tolist()


def _cosines(rows: torch.Tensor) -> list[list[float]]:
    unit = rows.double() / rows.double().norm(dim=-1, keepdim=True)
    return (unit @ unit.T).tolist()


def _shared(head_sims: list[list[float]], teacher_sims: list[list[float]], k: int) -> list[int]:
    """Each pair's number of neighbours shared by the head and the teacher: pair i's neighbours are the k other pairs
    most similar to it, ties to the lower index."""

    def neighbours(sims: list[list[float]], i: int) -> set[int]:
        return set(sorted((j for j in range(len(sims)) if j != i), key=lambda j: (-sims[i][j], j))[:k])

    return [len(neighbours(head_sims, i) & neighbours(teacher_sims, i)) for i in range(len(head_sims))]


def _brute_deltas(before: list[list[int]], after: list[list[int]], picks: list[list[int]], k: int) -> np.ndarray:
    """``[resamples, heads]`` after - before MKNN of each resample: its pairs' shared neighbours as counted on the full
    set, summed pair by pair."""
    return np.array([[sum(a[i] - b[i] for i in row) / (len(row) * k) for b, a in zip(before, after, strict=True)]
                     for row in picks])


def _head_sims(pooled: list[torch.Tensor], weights: list[torch.Tensor], clamp: float) -> list[list[list[float]]]:
    """Every head's cosine similarities of its explicit representations ``[N, d]`` (PRH's clamp over all N pairs)."""
    out = []
    for layer in range(LAYERS):
        for head in range(HEADS):
            cols = slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)
            explicit = pooled[layer][:, cols].double() @ weights[layer][:, cols].double().T
            out.append(_cosines(clamp_outliers(explicit, clamp)))
    return out


@pytest.mark.parametrize("num,k,clamp", [(16, 3, 0.0), (64, 3, 0.95)])
def test_each_pairs_overlap_is_its_brute_force_shared_neighbours(num: int, k: int, clamp: float) -> None:
    pooled, weights, _, teacher = _inputs(num, seed=num)
    got = all_head_neighbours(pooled, weights, teacher, k, HEAD_DIM, clamp=clamp)
    assert got.scores.shape == (LAYERS, HEADS) and got.overlaps.shape == (LAYERS, HEADS, num)
    assert torch.equal(got.scores, got.overlaps.mean(-1))  # the score is the mean of the kept overlaps
    teacher_sims = _cosines(clamp_outliers(teacher.double(), clamp))
    want = [_shared(sims, teacher_sims, k) for sims in _head_sims(pooled, weights, clamp)]
    assert (got.overlaps * k).flatten(0, 1).tolist() == want


def test_paired_bootstrap_equals_a_brute_force_loop_over_resamples_and_pairs(monkeypatch) -> None:
    num, k, resamples, seed = 20, 3, 25, 7
    pooled, before_w, after_w, teacher = _inputs(num, seed=3)
    before = all_head_neighbours(pooled, before_w, teacher, k, HEAD_DIM)
    after = all_head_neighbours(pooled, after_w, teacher, k, HEAD_DIM)
    boot = paired_bootstrap(before, after, k, seed, resamples=resamples)
    assert boot.settings["resamples"] == resamples and boot.deltas.shape == (resamples, LAYERS, HEADS)
    teacher_sims = _cosines(teacher)
    picks = _draw(num, resamples, seed)
    assert all(len(set(row)) < num for row in picks)  # real resamples: some pairs twice, some left out
    want = _brute_deltas([_shared(sims, teacher_sims, k) for sims in _head_sims(pooled, before_w, 0.0)],
                         [_shared(sims, teacher_sims, k) for sims in _head_sims(pooled, after_w, 0.0)], picks, k)
    np.testing.assert_array_equal(boot.deltas.reshape(resamples, -1), want)
    tail = (1.0 - 0.95) / 2  # the 95% interval's tails as the bootstrap computes them (0.025 + 2e-17)
    np.testing.assert_array_equal(boot.low.flatten(), np.quantile(want, tail, axis=0))
    np.testing.assert_array_equal(boot.high.flatten(), np.quantile(want, 1.0 - tail, axis=0))
    np.testing.assert_array_equal(boot.noise, within_noise(boot.delta, boot.low, boot.high, resolution(num, k)))
    monkeypatch.setattr(noise, "_CHUNK_ELEMENTS", 4 * num)  # resamples drawn 4 at a time: no number changes
    np.testing.assert_array_equal(paired_bootstrap(before, after, k, seed, resamples=resamples).deltas, boot.deltas)
    assert not np.array_equal(paired_bootstrap(before, after, k, seed + 1, resamples=resamples).deltas, boot.deltas)


def _constructed(num: int = 24, k: int = 3) -> tuple[HeadNeighbours, HeadNeighbours]:
    """Two heads (one layer): head 0 unchanged by training; head 1 random before and the teacher's own neighbours
    after (MKNN 1.0), a change far beyond noise."""
    gen = torch.Generator().manual_seed(0)
    teacher_feats = torch.randn(num, 6, generator=gen)
    teacher = all_head_neighbours([teacher_feats], [torch.eye(6)], teacher_feats, k, 6)
    random_feats = torch.randn(num, 6, generator=gen)
    unchanged = all_head_neighbours([random_feats], [torch.eye(6)], teacher_feats, k, 6)
    assert float(teacher.scores[0, 0]) == 1.0 and float(unchanged.scores[0, 0]) < 0.5

    def stack(*heads: HeadNeighbours) -> HeadNeighbours:
        return HeadNeighbours(torch.cat([h.scores for h in heads], dim=1),
                              torch.cat([h.overlaps for h in heads], dim=1))

    return stack(unchanged, unchanged), stack(unchanged, teacher)


def test_changes_within_noise_are_marked_in_rows_json_and_plot(tmp_path: Path) -> None:
    from llamafactory_hera.plots.heads import plot_before_after

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
