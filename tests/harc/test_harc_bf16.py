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

from conftest import harc_recipe, read_log_history, saved_in_bf16

TERMS = ("harc_couple", "harc_couple_resp", "harc_kl", "harc_ce")


def _one_step(harc_assets: Any, output: Path, bf16: bool) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    from llamafactory.train.tuner import run_exp

    model = saved_in_bf16(harc_assets.models["llama3"], output.parent / f"{output.name}_model") if bf16 else (
        harc_assets.models["llama3"])
    run_exp(harc_recipe(harc_assets, "llama3", output, bf16=bf16, use_cpu=True, max_steps=1, harc_eval=False,
                        model_name_or_path=str(model),
                        save_strategy="no", harc_refresh_steps=0, harc_batch_harmful=2, harc_batch_harmless=2,
                        harc_batch_pseudo=1, harc_layers=5, harc_layers_final=5))
    log = next(line for line in read_log_history(output) if "loss" in line)
    return log, torch.load(output / "harc_directions.pt", weights_only=False)["base"]


def test_one_bf16_step_matches_fp32_within_bf16_rounding(harc_assets: Any, tmp_path: Path) -> None:
    """The first step's logged terms and loss, and the base directions, of a bf16 run (from a checkpoint saved in bf16,
    as Hub checkpoints are: bf16 weights and a bf16 residual stream) against an fp32 run.

    Every layer of the band is coupled (``harc_layers: 5`` of layers 1-5), in both runs: the tiny random model's layer
    scores are near-tied (layers 2 and 3: 0.003917 and 0.003863 in fp32), bf16 swaps them, and two runs coupling
    different layers give different terms (couple 0.310 against 0.285) whatever the arithmetic.

    Measured (tiny Llama-3, 2 + 2 + 1 rows x 2 micro-batches): direction cosines bf16 vs fp32 >= 0.9999 (angle
    <= 1.4e-2 rad; the residuals differ by 0.2-0.7 % relative, one bf16 rounding per layer's output); terms within
    5.6e-4 relative (couple 2.3e-4, couple_resp 5.6e-4, ce 5.2e-6, loss 2.4e-5; KL 0 in both: the adapter starts as
    the identity). Tolerances: cosine >= 1 - 3e-4 (three times the measured 1 - 0.999902: a direction is a difference
    of means of nearly equal residuals, which magnifies their 0.7 % by |residual| / |difference|) and terms within
    1e-2 relative (2.5 roundings of 4e-3). HARC's own arithmetic is in float64 (means) / float32 (cosines, softmax,
    cross-entropy); bf16 accumulation of the means (4 rows summed with a rounding at each add) or cosines in bf16
    would add errors of the same size per operation on top.
    """
    fp32_log, fp32_dirs = _one_step(harc_assets, tmp_path / "fp32", bf16=False)
    bf16_log, bf16_dirs = _one_step(harc_assets, tmp_path / "bf16", bf16=True)
    assert fp32_log["harc_layers"] == bf16_log["harc_layers"] == "1,2,3,4,5"
    figures = {key: (fp32_log[key], bf16_log[key]) for key in (*TERMS, "loss")}
    cosines = {}
    for name, reference in fp32_dirs.items():
        assert bf16_dirs[name].dtype == torch.float32 and bf16_dirs[name].shape == reference.shape
        live = reference.norm(dim=-1) > 0.5  # a zero direction (no difference entering layer 0) has no angle
        cosines[name] = torch.nn.functional.cosine_similarity(bf16_dirs[name][live], reference[live], dim=-1)
    print("terms fp32 vs bf16:", figures)
    print("direction cosines bf16 vs fp32 (per live layer):", {k: [round(float(c), 6) for c in v]
                                                               for k, v in cosines.items()})
    assert all(float(c.min()) >= 1 - 3e-4 for c in cosines.values()), cosines
    for key, (fp32, bf16) in figures.items():  # relative to max(|fp32|, 0.1): the KL is 0 in both at step 1
        assert abs(bf16 - fp32) <= 1e-2 * max(abs(fp32), 0.1), (key, fp32, bf16)
