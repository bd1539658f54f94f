"""``stage: harc`` in bf16 (as every shipped recipe runs) against fp32 on the CPU: same seed, same rows, one step.

bf16 keeps 8 significant bits: each rounding is off by up to 2^-9 ~ 2e-3 relative (4e-3 between two roundings). The
tiny model's bf16 forward rounds every layer's output, so its residuals and logits differ from fp32's by several
roundings; HARC's own arithmetic (means, cosines, losses) must add nothing beyond that, which it does by computing in
float64 (means) / float32 (cosines, softmax, cross-entropy) whatever the model's dtype.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from conftest import harc_recipe, read_log_history

TERMS = ("harc_couple", "harc_couple_resp", "harc_kl", "harc_ce")


def _one_step(harc_assets: Any, output: Path, bf16: bool) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    from llamafactory.train.tuner import run_exp

    run_exp(harc_recipe(harc_assets, "llama3", output, bf16=bf16, use_cpu=True, max_steps=1, harc_eval=False,
                        save_strategy="no", harc_refresh_steps=0, harc_batch_harmful=2, harc_batch_harmless=2,
                        harc_batch_pseudo=1))
    log = next(line for line in read_log_history(output) if "loss" in line)
    return log, torch.load(output / "harc_directions.pt", weights_only=False)["base"]


def test_one_bf16_step_matches_fp32_within_bf16_rounding(harc_assets: Any, tmp_path: Path) -> None:
    """The first step's logged terms and loss, and the base directions, of a bf16 run against an fp32 run.

    Measured (tiny Llama-3, 2 + 2 + 1 rows x 2 micro-batches): direction cosines bf16 vs fp32 >= 0.99999 (angle
    <= 4.5e-3 rad, about one bf16 rounding of 2^-9 ~ 2e-3 relative per residual); terms within 2.3e-3 relative
    (couple 7.7e-4, couple_resp 2.3e-3, ce 2.2e-5, loss 8.4e-5; KL 0 in both: the adapter starts as the identity).
    Tolerances: cosine >= 1 - 1e-4 (angle 1.4e-2 rad: three roundings of ~4e-3 each, the model's bf16 residuals
    carry one per layer output) and terms within 1e-2 relative (2.5 roundings of 4e-3). HARC's own arithmetic is in
    float64 (means) / float32 (cosines, softmax, cross-entropy); bf16 accumulation of the means (4 rows summed with a
    rounding at each add) or cosines in bf16 would add errors of the same size per operation on top.
    """
    fp32_log, fp32_dirs = _one_step(harc_assets, tmp_path / "fp32", bf16=False)
    bf16_log, bf16_dirs = _one_step(harc_assets, tmp_path / "bf16", bf16=True)
    figures = {key: (fp32_log[key], bf16_log[key]) for key in (*TERMS, "loss")}
    cosines = {}
    for name, reference in fp32_dirs.items():
        assert bf16_dirs[name].dtype == torch.float32 and bf16_dirs[name].shape == reference.shape
        live = reference.norm(dim=-1) > 0.5  # a zero direction (no difference entering layer 0) has no angle
        cosines[name] = torch.nn.functional.cosine_similarity(bf16_dirs[name][live], reference[live], dim=-1)
    print("terms fp32 vs bf16:", figures)
    print("direction cosines bf16 vs fp32 (per live layer):", {k: [round(float(c), 6) for c in v]
                                                               for k, v in cosines.items()})
    assert all(float(c.min()) >= 1 - 1e-4 for c in cosines.values()), cosines
    for key, (fp32, bf16) in figures.items():  # relative to max(|fp32|, 0.1): the KL is 0 in both at step 1
        assert abs(bf16 - fp32) <= 1e-2 * max(abs(fp32), 0.1), (key, fp32, bf16)
