"""Gradient checkpointing per decoder layer: HeRA leaves every layer the recipe's kind (reentrant by default) and reads
its heads' inputs out of a reentrant layer's checkpoint, as one more output, through the real ``run_exp``.

The HeRA gradient must not depend on it: with the heads in the middle layer of three, the gradient of every
trainable parameter is the same under the default (reentrant everywhere, the heads read out of their layer's),
non-reentrant checkpointing everywhere and no checkpointing, in full fine-tuning, with LoRA and with the projector
trained (HeRA's gradient reaches it through the reentrant layer 0); and the HeRA part of it (lambda 1 minus lambda 0)
reaches the reentrant layer below the heads and nothing above them.

The start line says what the steps run under: ``gradient_checkpointing: true`` makes the Trainer re-enable
checkpointing, reentrant whatever ``use_reentrant_gc`` says, and LLaMA-Factory checkpoints no layer without a
trainable parameter (every layer of a frozen language model).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

import llamafactory_hera.hera.parsed_checks as host_checks
from conftest import FirstGradients, base_recipe
from llamafactory_hera.hera.config import parse_hera_arguments

SETTINGS: dict[str, dict[str, Any]] = {
    "default": {},
    "non_reentrant": {"use_reentrant_gc": False},
    "off": {"disable_gradient_checkpointing": True},
    # the Trainer re-enables checkpointing when training starts, reentrant: as "default" in the steps
    "trainer_reenables": {"use_reentrant_gc": False, "gradient_checkpointing": True},
    "frozen_lm": {"freeze_language_model": True, "freeze_multi_modal_projector": False},
}
MIXED = ("gradient checkpointing: reentrant (the recipe's) in every decoder layer; HeRA's heads read out of the "
         "reentrant checkpoint of layer 1")
LINES = {
    "default": MIXED,
    "non_reentrant": "gradient checkpointing: non-reentrant (the recipe's) in every decoder layer",
    "off": "gradient checkpointing: off (the recipe's) in every decoder layer",
    "trainer_reenables": MIXED,
    "frozen_lm": "gradient checkpointing: off (no trainable parameters) in every decoder layer",
}
# (tuning, setting) of the gradient comparisons beyond full fine-tuning, each against no checkpointing
TUNINGS: dict[str, dict[str, Any]] = {
    "full": {"finetuning_type": "full"},
    "lora": {"finetuning_type": "lora", "lora_target": "all"},
    "projector": {"finetuning_type": "full", "freeze_multi_modal_projector": False},
}
RUNS = [("full", "default", 1.0), ("full", "default", 0.0), ("full", "non_reentrant", 1.0), ("full", "off", 1.0),
        ("full", "frozen_lm", 1.0), ("lora", "trainer_reenables", 1.0),
        ("lora", "off", 1.0), ("projector", "default", 1.0), ("projector", "off", 1.0)]


@pytest.fixture(scope="module")
def gradients(assets, tmp_path_factory) -> dict[tuple[str, str, float], tuple[dict[str, torch.Tensor], str]]:
    """(tuning, setting, lambda) -> (gradients, the run's printed output) of one step, heads in layer 1."""
    import contextlib
    import io

    from llamafactory.train.tuner import run_exp

    runs = {}
    for tuning, setting, lam in RUNS:
        probe, printed = FirstGradients(), io.StringIO()
        recipe = base_recipe(assets, "qwen3_vl", tmp_path_factory.mktemp(f"{tuning}_{setting}_{lam}"), max_steps=1,
                             hera_heads=["L1H0", "L1H3"], hera_lambda=lam, max_grad_norm=0.0, hera_monitor_steps=0,
                             **TUNINGS[tuning], **SETTINGS[setting])
        with contextlib.redirect_stdout(printed):
            run_exp(recipe, callbacks=[probe])
        runs[(tuning, setting, lam)] = (probe.grads, printed.getvalue())
    return runs


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_start_line_says_which_layers_checkpoint_how(gradients, setting: str) -> None:
    printed = gradients[("lora" if setting == "trainer_reenables" else "full", setting, 1.0)][1]
    start = next(line for line in printed.splitlines() if "HeRA: heads" in line)
    assert start.endswith(LINES[setting]), start


@pytest.mark.parametrize("tuning, setting, other", [("full", "default", "non_reentrant"), ("full", "default", "off"),
                                                    ("lora", "trainer_reenables", "off"),
                                                    ("projector", "default", "off")])
def test_hera_gradients_do_not_depend_on_the_checkpointing(gradients, tuning: str, setting: str, other: str) -> None:
    mixed, unmixed = gradients[(tuning, setting, 1.0)][0], gradients[(tuning, other, 1.0)][0]
    assert mixed.keys() == unmixed.keys() and any("layers.0." in name for name in mixed)
    if tuning == "lora":
        assert all("lora_" in name for name in mixed) and any("layers.0." in name and "lora_" in name for name in mixed)
    if tuning == "projector":  # the merger trains and HeRA's gradient reaches it (through reentrant layer 0)
        merger = [name for name in mixed if "merger" in name]
        assert merger and any(mixed[name].abs().max() > 0 for name in merger), sorted(mixed)
    for name, grad in mixed.items():
        torch.testing.assert_close(grad, unmixed[name], rtol=1e-5, atol=1e-7, msg=name)


def test_hera_gradient_passes_the_reentrant_layer_below_and_nothing_above(gradients) -> None:
    with_hera, without = gradients[("full", "default", 1.0)][0], gradients[("full", "default", 0.0)][0]
    part = {name: (grad - without[name]).abs().max().item() for name, grad in with_hera.items()}
    below = {name: value for name, value in part.items() if "language_model.layers.0." in name}
    above = {name: value for name, value in part.items() if "language_model.layers.2." in name}
    assert below and above
    assert all(value > 0 for name, value in below.items() if ".self_attn." in name or ".mlp." in name), below
    assert all(value == 0 for value in above.values()), above


@pytest.mark.parametrize(("finetuning", "zero3", "checkpointing", "version", "warns"), [
    ("lora", True, True, "0.19.2", True),  # before deepspeedai/DeepSpeed#8148
    ("lora", True, True, "0.19.3", False),  # the first release with it
    ("lora", True, True, "0.19.8", False),
    ("full", True, True, "0.19.2", False),  # no frozen parameter in a trained layer
    ("lora", False, True, "0.19.2", False),  # ZeRO-2: parameters are never partitioned
    ("lora", True, False, "0.19.2", False),  # no checkpointing, no recompute
    ("lora", True, True, "unknown", False),
])
def test_zero3_lora_warns_on_a_deepspeed_without_the_frozen_recompute_fix(finetuning: str, zero3: bool,
                                                                          checkpointing: bool, version: str,
                                                                          warns: bool) -> None:
    warning = host_checks.zero3_frozen_recompute_warning(finetuning, zero3, checkpointing, version)
    assert (warning is not None) == warns
    if warning is not None:
        assert "deepspeed 0.19.2" in warning and "0.19.3" in warning and "\n" not in warning


def test_host_checks_print_the_zero3_lora_warning(assets, tmp_path, monkeypatch, capsys) -> None:
    """Printed by the host checks, before the model loads, on rank 0 of a LoRA run under ZeRO-3."""
    recipe = base_recipe(assets, "qwen3_vl", tmp_path / "out")
    model = SimpleNamespace(model_name_or_path=recipe["model_name_or_path"], trust_remote_code=True,
                            adapter_name_or_path=None, quantization_bit=None, disable_gradient_checkpointing=False)
    data = SimpleNamespace(dataset=["hera_demo"], dataset_dir=recipe["dataset_dir"], template=recipe["template"])
    training = SimpleNamespace(world_size=1, process_index=0, per_device_train_batch_size=8, fsdp="", do_train=True,
                               output_dir=str(tmp_path / "out"), deepspeed="ds_z3_config.json")
    monkeypatch.setattr(host_checks, "check_run_inputs", lambda *args, **kwargs: None)
    monkeypatch.setattr(host_checks, "host_version", lambda name: "0.19.2" if name == "deepspeed" else "unknown")
    monkeypatch.setattr(host_checks, "is_deepspeed_zero3_enabled", lambda: True)
    hera = parse_hera_arguments({k: v for k, v in recipe.items() if k.startswith("hera_")})
    host_checks.validate_host_args(model, data, training, SimpleNamespace(finetuning_type="lora"), SimpleNamespace(),
                                   hera)
    assert "warning: DeepSpeed ZeRO-3 with finetuning_type: lora" in capsys.readouterr().out
