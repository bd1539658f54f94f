"""RAH-LoRA's numerical steps against slow, obviously-correct references (loops over tokens, heads, elements)."""

from __future__ import annotations

import math
import statistics
from typing import Any

import numpy as np
import pytest
import torch

from llamafactory_hera.rah.scores import caf_scores, isal, margin_loss, standardize_per_layer
from llamafactory_hera.rah.targets_anchors import (
    anchor_candidates,
    anchor_pool,
    similarity,
    targets_in_layer,
    top_anchors,
)
from llamafactory_hera.rah.update import low_rank, mean_kl, search_alpha, trimmed_mean


def _causal_attention(batch: int, heads: int, length: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, heads, length, length, generator=generator)
    mask = torch.ones(length, length, dtype=torch.bool).tril()
    return scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)


def _isal_loop(attn: torch.Tensor, image: list[bool], text: list[bool], head: int, pairs: str) -> float:
    a = attn[head].tolist()
    t2i = [a[i][j] for i in range(len(image)) for j in range(len(image))
           if text[i] and image[j] and (pairs == "paper" or j <= i)]
    i2t = [a[i][j] for i in range(len(image)) for j in range(len(image)) if image[i] and text[j] and j <= i]
    halves = [sum(values) / len(values) for values in (t2i, i2t) if values]
    return sum(halves) / len(halves)


@pytest.mark.parametrize("pairs", ["paper", "visible"])
def test_isal_equals_a_per_token_loop(pairs: str) -> None:
    length = 14
    attn = _causal_attention(3, 5, length, seed=1)
    # sample 0: BOS, 3 text, 5 image, 5 text; sample 1: image first after BOS (no text before it); sample 2: two
    # images with text between them
    layouts = [[0] + [1] * 3 + [2] * 5 + [1] * 5, [0] + [2] * 6 + [1] * 7,
               [0, 1] + [2] * 3 + [1] * 2 + [2] * 3 + [1] * 4]
    image = torch.tensor([[x == 2 for x in row] for row in layouts])
    text = torch.tensor([[x == 1 for x in row] for row in layouts])
    scores, both = isal(attn, image, text, pairs=pairs)
    for b in range(3):
        for h in range(5):
            expected = _isal_loop(attn[b], image[b].tolist(), text[b].tolist(), h, pairs)
            assert float(scores[b, h]) == pytest.approx(expected, rel=1e-5)
    assert both.tolist() == [True, False, True]  # sample 1: no text before the image, text->image alone


def test_isal_refuses_a_sample_without_image_tokens() -> None:
    attn = _causal_attention(1, 2, 6, seed=2)
    with pytest.raises(ValueError, match="no visible pair of text and image tokens"):
        isal(attn, torch.zeros(1, 6, dtype=torch.bool), torch.ones(1, 6, dtype=torch.bool))


def test_standardisation_within_each_layer() -> None:
    table = torch.randn(4, 7, generator=torch.Generator().manual_seed(3))
    result = standardize_per_layer(table)
    for layer in range(4):
        row = table[layer].tolist()
        mu, sigma = statistics.fmean(row), statistics.pstdev(row)
        for head in range(7):
            assert float(result[layer, head]) == pytest.approx((row[head] - mu) / (sigma + 1e-6), rel=1e-4)


def test_margin_loss_equals_minus_mean_log_ratio_of_the_two_most_probable_tokens() -> None:
    logits = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(4))
    positions = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]], dtype=torch.bool)
    terms = []
    for b in range(2):
        for t in range(5):
            if positions[b, t]:
                probs = sorted(np.exp(logits[b, t].double().numpy()) / np.exp(logits[b, t].double().numpy()).sum())
                terms.append(math.log(probs[-1] / probs[-2]))
    assert float(margin_loss(logits, positions)) == pytest.approx(-sum(terms) / len(terms), rel=1e-5)


def test_caf_forms() -> None:
    grads = torch.randn(6, 2, 5, generator=torch.Generator().manual_seed(5))
    paper = caf_scores(grads, form="paper", weight=0.5)
    magnitude = caf_scores(grads, form="magnitude", weight=0.25)
    for layer in range(2):
        means = [statistics.fmean(grads[:, layer, h].tolist()) for h in range(5)]
        squares = [statistics.fmean([g * g for g in grads[:, layer, h].tolist()]) for h in range(5)]

        def z(values: list[float]) -> list[float]:
            mu, sigma = statistics.fmean(values), statistics.pstdev(values)
            return [(v - mu) / (sigma + 1e-6) for v in values]

        abs_z, sq_z = z([abs(m) for m in means]), z(squares)
        for h in range(5):
            assert float(paper[layer, h]) == pytest.approx(means[h] + 0.5 * squares[h], rel=1e-5, abs=1e-6)
            assert float(magnitude[layer, h]) == pytest.approx(abs_z[h] + 0.25 * sq_z[h], rel=1e-4, abs=1e-5)
    with pytest.raises(ValueError, match="rah_caf_form"):
        caf_scores(grads, form="signed")


def test_targets_and_anchors_on_a_hand_built_table() -> None:
    isal_std = torch.tensor([-2.0, -1.5, -0.2, 0.0, 0.1, 0.3, 0.9, 1.4])
    caf = torch.tensor([3.0, 0.1, 2.0, 0.0, 0.0, 0.0, 5.0, 4.0])
    # by hand (linear interpolation): isal 15th percentile at rank 1.05 = -1.5 + 0.05 * 1.3 = -1.435 -> heads 0, 1;
    # caf 70th at rank 4.9 = 2.0 + 0.9 * 1.0 = 2.9 -> heads 0, 6, 7; both: head 0
    assert np.percentile(isal_std.numpy(), 15) == pytest.approx(-1.435)
    assert np.percentile(caf.numpy(), 70) == pytest.approx(2.9)
    assert targets_in_layer(isal_std, caf) == [0]
    assert anchor_candidates(isal_std, beta=0.25, exclude=[0]) == [5, 6, 7]
    assert anchor_candidates(isal_std, beta=0.25, exclude=[6]) == [5, 7]


def test_similarity_and_top_anchors() -> None:
    generator = torch.Generator().manual_seed(6)
    maps, v, o = torch.rand(5, 9, generator=generator), torch.randn(5, 3, 8, generator=generator), \
        torch.randn(5, 8, 3, generator=generator)

    def cos(a: torch.Tensor, b: torch.Tensor) -> float:
        x, y = a.flatten().double().tolist(), b.flatten().double().tolist()
        return sum(p * q for p, q in zip(x, y, strict=True)) / math.sqrt(sum(p * p for p in x) * sum(q * q for q in y))

    candidates = [1, 3, 4]
    scores = similarity(0, candidates, maps, v, o, rho=0.6, w_v=0.7, w_o=0.3)
    for i, c in enumerate(candidates):
        expected = 0.6 * cos(maps[0], maps[c]) + 0.4 * (0.7 * cos(v[0], v[c]) + 0.3 * cos(o[0], o[c]))
        assert float(scores[i]) == pytest.approx(expected, rel=1e-5)
    assert top_anchors(torch.tensor([0.2, 0.9, 0.2]), [7, 2, 5], k=2) == [(2, pytest.approx(0.9)),
                                                                        (5, pytest.approx(0.2))]
    # GQA: candidate 1 reads the target's own V rows (cosine 1 by construction); its weight term is cos(O) alone
    v[1] = v[0]
    scores = similarity(0, candidates, maps, v, o, rho=0.6, w_v=0.7, w_o=0.3, shared_v={1})
    assert float(scores[0]) == pytest.approx(0.6 * cos(maps[0], maps[1]) + 0.4 * cos(o[0], o[1]), rel=1e-5)
    assert float(scores[1]) == pytest.approx(0.6 * cos(maps[0], maps[3]) + 0.4 * (0.7 * cos(v[0], v[3]) + 0.3 * cos(
        o[0], o[3])), rel=1e-5)


def test_anchor_pool_leaves_out_the_kv_group_and_falls_back_to_adjacent_layers() -> None:
    candidates = {0: [0, 1], 1: [], 2: [3], 4: [1, 2], 5: []}  # layer 3 is not calibrated
    assert anchor_pool(0, 0, candidates) == (0, [(0, 0), (0, 1)])
    assert anchor_pool(0, 0, candidates, group=2, own_group=False) == (None, [])  # heads 0-1: one KV group
    assert anchor_pool(0, 0, candidates, group=2, own_group=False, adjacent=2) == (2, [(2, 3)])
    assert anchor_pool(1, 2, candidates, adjacent=2) == (1, [(0, 0), (0, 1), (2, 3)])  # +-1 before +-2
    assert anchor_pool(5, 0, candidates, adjacent=1) == (1, [(4, 1), (4, 2)])
    assert anchor_pool(2, 0, {2: [], 4: [1]}, adjacent=1) == (None, [])  # layer 3 holds none: 4 is at distance 2
    assert anchor_pool(2, 0, {2: [], 4: [1]}, adjacent=2) == (2, [(4, 1)])


@pytest.mark.parametrize("k,trim,dropped", [(3, 0.1, 0), (10, 0.1, 1), (10, 0.25, 2)])
def test_trimmed_mean_element_wise(k: int, trim: float, dropped: int) -> None:
    stack = torch.randn(k, 3, 4, generator=torch.Generator().manual_seed(k))
    result = trimmed_mean(stack, trim)
    for i in range(3):
        for j in range(4):
            values = sorted(stack[:, i, j].tolist())
            kept = values[dropped:k - dropped]
            assert float(result[i, j]) == pytest.approx(sum(kept) / len(kept), rel=1e-5, abs=1e-6)
    with pytest.raises(ValueError, match="rah_trim"):
        trimmed_mean(stack[:2], 0.5)


def test_low_rank_is_the_truncated_svd() -> None:
    delta = torch.randn(16, 40, generator=torch.Generator().manual_seed(7))
    u, s, vh = low_rank(delta, 4)
    approx = (u * s) @ vh
    ref_u, ref_s, ref_vh = np.linalg.svd(delta.double().numpy(), full_matrices=False)
    reference = (ref_u[:, :4] * ref_s[:4]) @ ref_vh[:4]
    np.testing.assert_allclose(approx.numpy(), reference, rtol=1e-4, atol=1e-4)
    residual = float(torch.linalg.matrix_norm(delta - approx))  # Eckart-Young: the dropped singular values
    assert residual == pytest.approx(math.sqrt(float((ref_s[4:] ** 2).sum())), rel=1e-4)
    assert low_rank(delta[:3], 8)[1].shape == (3,)  # rank capped at min(m, n)


def test_mean_kl_is_the_mean_over_samples_of_each_samples_mean() -> None:
    """Eq. 15's expectation is over samples (x, v): a row with more probe positions weighs no more than another (the
    pooled mean over positions differs here); a row without positions is left out."""
    generator = torch.Generator().manual_seed(8)
    counts = [1, 4, 0, 2]
    p = [torch.randn(n, 6, generator=generator) for n in counts]
    q = [torch.randn(n, 6, generator=generator) for n in counts]
    samples = []
    for ref, cur in zip(p, q, strict=True):
        terms = []
        for t in range(ref.shape[0]):
            pp = np.exp(ref[t].double().numpy()) / np.exp(ref[t].double().numpy()).sum()
            qq = np.exp(cur[t].double().numpy()) / np.exp(cur[t].double().numpy()).sum()
            terms.append(float((pp * np.log(pp / qq)).sum()))
        if terms:
            samples.append(sum(terms) / len(terms))
    assert mean_kl(p, q) == pytest.approx(sum(samples) / len(samples), rel=1e-5)
    pooled = sum(s * n for s, n in zip(samples, [c for c in counts if c], strict=True)) / sum(counts)
    assert abs(mean_kl(p, q) - pooled) > 1e-3
    assert mean_kl(p, p) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("scale", [0.01, 0.2, 1.0, 3.0, 100.0])
def test_trust_region_keeps_the_largest_alpha_within_delta(scale: float) -> None:
    kl_at = lambda alpha: scale * alpha ** 2  # noqa: E731  (KL grows with the step)
    region = search_alpha(kl_at, alpha_max=0.15, delta=0.05, halvings=5)
    if region.rolled_back:
        assert all(kl > 0.05 for _, kl in region.tried) and len(region.tried) == 6
        return
    assert region.kl <= 0.05 and region.kl == kl_at(region.alpha)
    assert region.alpha == 0.15 or kl_at(2 * region.alpha) > 0.05
    assert region.tried[-1] == (region.alpha, region.kl)


def test_head_slices_follow_the_kv_groups() -> None:
    from llamafactory_hera.rah.calibrate import Geometry, o_columns, v_rows

    gqa = Geometry(num_heads=4, num_kv_heads=2, head_dim=16)  # Qwen2.5-VL-like: 2 query heads per KV group
    assert [v_rows(h, gqa) for h in range(4)] == [slice(0, 16), slice(0, 16), slice(16, 32), slice(16, 32)]
    assert [o_columns(h, gqa) for h in range(4)] == [slice(16 * h, 16 * (h + 1)) for h in range(4)]


def test_the_overlay_adds_each_kept_step_beside_an_offloaded_weight_and_removes_a_rejected_one() -> None:
    """A layer that does not merge (accelerate's CPU offload: its weight on meta, brought in for each forward) computes
    ``x W^T + b + x A^T B^T`` for its kept and tried steps (float64 by hand; a square layer, where ``x B A`` would run
    too), and a step tried and rejected is gone from the forward and the overlay (another kept step holds the hook)."""
    from accelerate import cpu_offload

    from llamafactory_hera.rah.overlay import WeightOverlay, merges

    torch.manual_seed(0)
    holder = torch.nn.Sequential(torch.nn.Linear(8, 8))
    linear = holder[0]
    weight, bias = linear.weight.detach().double().clone(), linear.bias.detach().double().clone()
    cpu_offload(holder, execution_device=torch.device("cpu"))  # as a decoder layer's: its linears' own hooks offload
    assert not merges(linear) and linear.weight.device.type == "meta"
    x = torch.randn(3, 5, 8)
    (b1, a1), (b2, a2) = ((torch.randn(8, 2), torch.randn(2, 8)) for _ in range(2))

    def by_hand(*steps: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        out = x.double() @ weight.T + bias
        return out + sum((x.double() @ a.double().T @ b.double().T for b, a in steps), torch.zeros(()))

    overlay = WeightOverlay()
    overlay.set_trial(linear, (b1, a1))
    with torch.no_grad():
        torch.testing.assert_close(linear(x).double(), by_hand((b1, a1)), rtol=0, atol=1e-5)
        overlay.settle(linear, keep=True)
        overlay.set_trial(linear, (b2, a2))
        torch.testing.assert_close(linear(x).double(), by_hand((b1, a1), (b2, a2)), rtol=0, atol=1e-5)
        overlay.settle(linear, keep=False)
        torch.testing.assert_close(linear(x).double(), by_hand((b1, a1)), rtol=0, atol=1e-5)
    assert not overlay.trial and list(overlay.kept) == [linear]


def test_the_profile_settings_are_the_arguments_without_prefix() -> None:
    from llamafactory_hera.rah.calibrate import Calibration
    from llamafactory_hera.rah.config import parse_rah_arguments
    from llamafactory_hera.rah.workflow import profile_record

    def settings(args: Any, layers: list[int]) -> dict[str, Any]:
        table = torch.zeros(len(layers), 4)
        calibration = Calibration(layers, table, table, table, [], ("o",), 0, 0)
        return profile_record(calibration, args, {}, {}, {})["settings"]

    chosen = settings(parse_rah_arguments({"rah_w_v": 0.5, "rah_update": "o", "rah_rank": 4}), [3])
    assert (chosen["layers"], chosen["w_v"], chosen["w_o"], chosen["update"], chosen["rank"]) == ([3], 0.5, 0.5, "o", 4)
    assert settings(parse_rah_arguments({}), [0, 1])["delta"] == 0.05


def test_rah_samples_below_the_probes_is_refused_by_the_parser() -> None:
    from llamafactory_hera.rah.config import parse_rah_arguments

    with pytest.raises(ValueError, match=r"rah_samples: got 16; the CAF and KL probes \(rah_probe_samples: 32, "
                                         r"rah_kl_samples: 8\) are drawn from the calibration rows, so at least 32"):
        parse_rah_arguments({"rah_samples": 16})
    assert parse_rah_arguments({"rah_samples": 16, "rah_probe_samples": 16}).rah_samples == 16


def test_the_profile_reports_kl_clamped_at_zero() -> None:
    """KL >= 0: float32 noise such as -2e-8 (measured on tiny models) is reported as 0; the order of outcomes."""
    from llamafactory_hera.rah.calibrate import Calibration, HeadUpdate
    from llamafactory_hera.rah.config import RahArguments
    from llamafactory_hera.rah.update import TrustRegion
    from llamafactory_hera.rah.workflow import profile_record

    kept = HeadUpdate(0, 1, [(1, 2, 0.5)], 1, TrustRegion(0.15, -2e-8, ((0.15, -2e-8),)))
    still = HeadUpdate(0, 3, [(0, 2, 0.4)], 0, TrustRegion(0.15, 0.0, ((0.15, 0.0),)), unchanged=True)
    back = HeadUpdate(0, 0, [(0, 2, 0.3)], 0, TrustRegion(0.0, None, ((0.15, 3e-8), (0.075, -1e-9))))
    table = torch.zeros(1, 4)
    calibration = Calibration([0], table, table, table, [kept, still, back, HeadUpdate(0, 2, [])], ("o",), 0, 0,
                              kl_to_original=-3e-8)
    record = profile_record(calibration, RahArguments(rah_layers=[0]), {}, {}, {})
    targets = record["targets"]
    assert [t["outcome"] for t in targets] == ["calibrated", "unchanged", "rolled back", "no anchor"]
    assert targets[0]["kl"] == 0.0 and targets[0]["tried"] == [{"alpha": 0.15, "kl": 0.0}]
    assert targets[2]["tried"][1]["kl"] == 0.0 and record["summary"]["kl_to_original"] == 0.0
    assert targets[0]["anchors"] == [{"head": "L1H2", "similarity": 0.5}] and targets[0]["anchor_distance"] == 1
    summary = record["summary"]
    assert (summary["calibrated"], summary["unchanged_in_model_dtype"], summary["rolled_back"],
            summary["without_anchor"], summary["anchors_from_adjacent_layers"]) == (1, 1, 1, 1, 1)
