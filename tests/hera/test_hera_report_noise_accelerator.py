"""``select --report``'s bootstrap on the simulated accelerator, from bf16 head inputs.

Every head's overlaps are scored on the device (``all_head_neighbours(..., device=)``, as ``select --report
--device`` scores them) from bfloat16 pooled inputs, weights and teacher features (a ``bf16: true`` recipe's), then
resampled by the bootstrap. Checked against the CPU run of the same calls (device placement changes no number: the
resamples are drawn by a seeded CPU generator) and against the brute-force reference of
tests/hera/test_hera_report_noise.py (a plain Python loop over the same resamples, float64 similarities of the same
bf16-rounded values).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_hera_report_noise import HEAD_DIM, _brute_deltas, _cosines, _draw, _head_sims, _inputs, _shared

from llamafactory_hera.hera.selection.noise import paired_bootstrap
from llamafactory_hera.hera.selection.scores import all_head_neighbours

pytestmark = pytest.mark.accelerator

NUM, K, RESAMPLES, SEED = 20, 3, 25, 7


def _neighbours(pooled, before_w, after_w, teacher, device):
    before = all_head_neighbours(pooled, before_w, teacher, K, HEAD_DIM, device=device)
    after = all_head_neighbours(pooled, after_w, teacher, K, HEAD_DIM, device=device)
    return before, after


def test_bootstrap_on_the_device_from_bf16_inputs(accelerator) -> None:
    from llamafactory_hera_testing.accelerator import DEVICE, to_device

    inputs = [[t.bfloat16() for t in group] if isinstance(group, list) else group.bfloat16()
              for group in _inputs(NUM, seed=3)]
    before_c, after_c = _neighbours(*inputs, device="cpu")
    on_cpu = paired_bootstrap(before_c, after_c, K, SEED, resamples=RESAMPLES)
    change_cpu = paired_bootstrap(before_c, after_c, K, SEED, resamples=200)
    with accelerator:
        accelerator.reset()
        before_d, after_d = _neighbours(*to_device(inputs), device=DEVICE)
        print("\nscoring syncs on the device:", dict(accelerator.counts))
        on_device = paired_bootstrap(before_d, after_d, K, SEED, resamples=RESAMPLES)
        change_device = paired_bootstrap(before_d, after_d, K, SEED, resamples=200)
    for ours, theirs in ((before_d, before_c), (after_d, after_c)):
        assert ours.scores.device.type == ours.overlaps.device.type == "cpu"
        assert torch.equal(ours.scores, theirs.scores) and torch.equal(ours.overlaps, theirs.overlaps)
    assert on_device.settings == on_cpu.settings and on_cpu.settings["resamples"] == RESAMPLES
    for field in ("low", "high", "noise", "deltas", "before", "after"):
        np.testing.assert_array_equal(getattr(on_device, field), getattr(on_cpu, field), err_msg=field)
        np.testing.assert_array_equal(getattr(change_device, field), getattr(change_cpu, field), err_msg=field)

    # the brute-force reference: the same resamples (seeded CPU generator), a plain loop, float64 similarities of the
    # bf16 values
    pooled, before_w, after_w, teacher = ([t.double() for t in group] if isinstance(group, list) else group.double()
                                          for group in inputs)
    teacher_sims = _cosines(teacher)
    want = _brute_deltas([_shared(sims, teacher_sims, K) for sims in _head_sims(pooled, before_w, 0.0)],
                         [_shared(sims, teacher_sims, K) for sims in _head_sims(pooled, after_w, 0.0)],
                         _draw(NUM, RESAMPLES, SEED), K)
    np.testing.assert_array_equal(on_device.deltas.reshape(RESAMPLES, -1), want)
    tail = (1.0 - 0.95) / 2
    np.testing.assert_array_equal(on_device.low.flatten(), np.quantile(want, tail, axis=0))
    np.testing.assert_array_equal(on_device.high.flatten(), np.quantile(want, 1.0 - tail, axis=0))
