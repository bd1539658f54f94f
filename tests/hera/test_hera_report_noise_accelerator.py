"""``select --report``'s bootstrap on the simulated accelerator, from bf16 head inputs.

The neighbours are ranked and the resamples scored on the device (``all_head_neighbours(..., device=)``,
``paired_bootstrap(..., device=)``, as ``select --report --device`` runs them) from bfloat16 pooled inputs, weights and
teacher features (a ``bf16: true`` recipe's). Checked against the CPU run of the same calls (device placement changes
no number: the resamples are drawn by a seeded CPU generator) and against the brute-force reference of
tests/hera/test_hera_report_noise.py (a plain Python loop over the same resamples, float64 similarities of the same
bf16-rounded values).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_hera_report_noise import HEAD_DIM, _brute_mknn, _cosines, _draw, _head_sims, _inputs

from llamafactory_hera.hera.selection.noise import paired_bootstrap, prefix_length
from llamafactory_hera.hera.selection.scores import all_head_neighbours

pytestmark = pytest.mark.accelerator

NUM, K, RESAMPLES, SEED = 20, 3, 25, 7


def _neighbours(pooled, before_w, after_w, teacher, device):
    prefix = prefix_length(NUM, K)
    before = all_head_neighbours(pooled, before_w, teacher, K, HEAD_DIM, device=device, prefix=prefix)
    after = all_head_neighbours(pooled, after_w, teacher, K, HEAD_DIM, device=device, prefix=prefix)
    return before, after


def test_bootstrap_on_the_device_from_bf16_inputs(accelerator) -> None:
    from llamafactory_hera_testing.accelerator import DEVICE, to_device

    inputs = [[t.bfloat16() for t in group] if isinstance(group, list) else group.bfloat16()
              for group in _inputs(NUM, seed=3)]
    before_c, after_c = _neighbours(*inputs, device="cpu")
    on_cpu = paired_bootstrap(before_c, after_c, K, SEED, resamples=RESAMPLES, batch=8)
    change_cpu = paired_bootstrap(before_c, after_c, K, SEED, resamples=200)
    with accelerator:
        before_d, after_d = _neighbours(*to_device(inputs), device=DEVICE)
        accelerator.reset()
        on_device = paired_bootstrap(before_d, after_d, K, SEED, resamples=RESAMPLES, batch=8, device=DEVICE)
        print("\nbootstrap syncs on the device:", dict(accelerator.counts))
        change_device = paired_bootstrap(before_d, after_d, K, SEED, resamples=200, device=DEVICE)
    for ours, theirs in ((before_d, before_c), (after_d, after_c)):
        assert ours.scores.device.type == ours.heads.device.type == ours.teacher.device.type == "cpu"
        assert torch.equal(ours.scores, theirs.scores) and torch.equal(ours.heads, theirs.heads)
        assert torch.equal(ours.teacher, theirs.teacher)
    for field in ("deltas", "low", "high"):
        assert isinstance(getattr(on_device, field), np.ndarray)  # brought back to the host
        np.testing.assert_array_equal(getattr(on_device, field), getattr(on_cpu, field), err_msg=field)
    assert on_device.settings == on_cpu.settings and on_cpu.settings["resamples"] == RESAMPLES
    assert on_cpu.settings["redrawn"] == 0
    for field in ("low", "high", "noise", "deltas", "before", "after"):
        np.testing.assert_array_equal(getattr(change_device, field), getattr(change_cpu, field), err_msg=field)

    # the brute-force reference: the same resamples (seeded CPU generator), a plain loop, float64 similarities of the
    # bf16 values
    pooled, before_w, after_w, teacher = ([t.double() for t in group] if isinstance(group, list) else group.double()
                                          for group in inputs)
    picks = _draw(NUM, RESAMPLES, SEED)
    teacher_sims = _cosines(teacher)
    want = np.array([[_brute_mknn(a, teacher_sims, row, K) - _brute_mknn(b, teacher_sims, row, K)
                      for b, a in zip(_head_sims(pooled, before_w, 0.0), _head_sims(pooled, after_w, 0.0),
                                      strict=True)] for row in picks])
    np.testing.assert_allclose(on_device.deltas.reshape(RESAMPLES, -1), want, atol=1e-6)
    np.testing.assert_allclose(on_device.low.flatten(), np.quantile(want, 0.025, axis=0), atol=1e-6)
    np.testing.assert_allclose(on_device.high.flatten(), np.quantile(want, 0.975, axis=0), atol=1e-6)
