"""``llamafactory-hera plan`` takes every batch training takes: a HeRA micro-batch of 1 counts the contrastive set
training forms (the gathered batch set and the queue), a set training refuses is refused with training's line; an
epoch's optimizer steps are its rows over the samples of all GPUs; bitsandbytes' 4-bit bytes with and without double
quantization, in memory and in what FSDP2 gathers."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from test_plan import COUNTS, setup, tiny_recipe  # noqa: F401  (tiny_recipe: a fixture)
from test_plan_families import REPO, count, hub_cache, main, step

from llamafactory_hera.plan import estimate, timing
from llamafactory_hera.plan.cards import CARDS
from llamafactory_hera.recipe.quantization import quantized_bytes_per_weight


def test_the_term_of_a_micro_batch_of_one_is_taken_against_its_contrastive_set() -> None:
    """One anchor against 45 candidates (1 of the batch set, a queue of 44): a finite loss with a gradient to the
    anchor. Before: "k=0 needs 1 <= k <= C-1 with C=1 candidates" (the micro-batch alone)."""
    reps = torch.randn(5, 1, 16, requires_grad=True)
    parts = step.HeraParts(None, None, torch.nn.Parameter(torch.tensor(math.log(0.07))), 10, 0.01, "cosine", 45)
    loss = step.hera_term(parts, reps)
    loss.backward()
    assert math.isfinite(float(loss)) and reps.grad is not None


def _hera(path, **keys) -> None:
    recipe = {**yaml.safe_load(path.read_text()), "stage": "hera", "quantization_bit": None, "hera_heads": ["L0H1"],
              "hera_lambda": 0.1, "enable_liger_kernel": False, **keys}
    path.write_text(yaml.safe_dump(recipe))


def test_plan_counts_heras_batch_of_one_with_the_queue(tiny_recipe, capsys) -> None:  # noqa: F811
    """The tiny model's HeRA step at batch 1 on 1 GPU (counted): the queue's figures, as training's start line gives
    them."""
    _hera(tiny_recipe, per_device_train_batch_size=1)
    assert main(["plan", str(tiny_recipe)]) == 0
    out = capsys.readouterr().out
    assert "  HeRA: contrastive set up to 45 samples; queue 44 (auto: contrastive sets of at most 1 image samples " \
        "(per_device_train_batch_size 1 x 1 process(es)) are smaller than 11 (hera_k+1, and at least 3 for a " \
        "negative))" in out
    assert "micro-batch 1 x accumulation 2" in out and "HERA" in out


@pytest.mark.parametrize(("keys", "said"), [
    ({"hera_queue_size": 0}, "stage: hera: with per_device_train_batch_size: 1 on 1 process(es) and hera_queue_size: "
     "0, the contrastive sets can never hold 2 image samples"),
    ({"hera_queue_size": 4}, "hera_k: 10: each contrastive set needs hera_k + 1 = 11 samples"),
])
def test_a_contrastive_set_training_refuses_is_a_line_about_the_recipe(tiny_recipe, keys, said, capsys) -> None:  # noqa: F811
    """Batch 1 without the queue, or a queue too short for hera_k: training's own line, naming the keys."""
    _hera(tiny_recipe, per_device_train_batch_size=1, **keys)
    assert main(["plan", str(tiny_recipe)]) == 2
    err = capsys.readouterr().err
    assert said in err and "C-1" not in err and err.count("\n") == 1


def test_the_72b_recipe_at_batch_one_plans_the_queue(tmp_path, monkeypatch, capsys) -> None:
    """The shipped 72B recipe as a first try at batch 1 on its 8 GPUs: the set is 8 gathered samples and a queue of
    44, the HeRA arm counted with them (the count itself stubbed: minutes at 72B on 2 cores)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache(tmp_path / "hub")))
    monkeypatch.chdir(REPO)
    counted: list[int | None] = []

    def stub(config, shape: count.Shape) -> dict[str, float]:
        counted.append(shape.hera and shape.hera["hera_candidates"])
        return dict.fromkeys(count.FIGURES, 1e9) | {"trainable": 1e6, "params": 1e10}

    monkeypatch.setattr(count, "count", stub)
    assert main(["plan", "recipes/qwen2_5_72b_hera_fsdp2.yaml", "per_device_train_batch_size=1",
                 "--accelerate-config", "recipes/accelerate/fsdp2_config.yaml"]) == 0
    out = capsys.readouterr().out
    assert "HeRA: contrastive set up to 52 samples; queue 44 (auto: contrastive sets of at most 8 image samples " \
        "(per_device_train_batch_size 1 x 8 process(es))" in out
    assert 52 in counted and "micro-batch 1 x accumulation 8" in out


def test_an_epochs_steps_are_its_rows_over_every_gpus_samples() -> None:
    """1,000 rows, micro-batch 2 x accumulation 4: 125 optimizer steps on 1 GPU, 16 on 8 (64 rows a step)."""
    card = CARDS["H200"]
    one = timing.times(1e12, 1000, setup(batch=2, accumulation=4, gpus=1), card, 1000, 100)
    eight = timing.times(1e12, 1000, setup(batch=2, accumulation=4, gpus=8), card, 1000, 100)
    assert one["steps"] == (125, 125) and eight["steps"] == (16, 16)
    assert eight["gpu-hours"] == pytest.approx(tuple(s * 16 * 8 / 3600 for s in eight["step"]))


def test_four_bit_bytes_with_and_without_double_quantization() -> None:
    """nf4: half a byte a weight plus its block's absmax per 64 weights, a float32 (4 bytes), or with double
    quantization 1 byte plus a float32 per 256 blocks: 0.5156 and 0.5625 bytes a weight. Plan's memory and FSDP2's
    gathered bytes take the recipe's double_quantization."""
    assert quantized_bytes_per_weight(4, double_quant=True) == 0.5 + (1 + 4 / 256) / 64
    assert quantized_bytes_per_weight(4, double_quant=False) == 0.5 + 4 / 64
    saved = 800 * (4 - (1 + 4 / 256)) / 64  # COUNTS' 800 quantizable weights
    plain = setup(bits=4, double_quant=False)
    double = setup(bits=4, double_quant=True)
    assert estimate.memory(COUNTS, plain)["parameters"] - estimate.memory(COUNTS, double)["parameters"] == \
        pytest.approx(saved)
    fsdp = {"engine": "fsdp2", "gpus": 4}
    gathered = [estimate.communicated(COUNTS, setup(bits=4, double_quant=on, **fsdp))[0] for on in (False, True)]
    assert gathered[0] - gathered[1] == pytest.approx(3 / 4 * 2 * saved)
