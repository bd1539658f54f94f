"""Gradient checkpointing per decoder layer under HARC, through the real ``run_exp``: every layer runs the recipe's
kind (LLaMA-Factory's default: reentrant), the coupled layers included, before and after a refresh and the ramp
move them; the coupling reads each coupled layer's input (a forward pre-hook: the checkpoint's own input), which keeps
its graph under reentrant checkpointing.

The training must not depend on it: the gradients of the first step and the adapter after the refresh (step 2) and
the ramp (step 3) are the same under the default (reentrant everywhere) and under non-reentrant checkpointing
everywhere (what the stage forced on every layer before; then it switched the coupled layers). The start line says
how the layers run.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from conftest import FirstGradients
from llamafactory_hera.heads.architecture import text_decoder
from llamafactory_hera.training.layer_checkpointing import checkpointing_kind
from llamafactory_hera_testing.recipes import harc_recipe

SETTINGS: dict[str, dict[str, Any]] = {
    "default": {},
    "non_reentrant": {"use_reentrant_gc": False},
}


class StepKinds(FirstGradients):
    """Also each optimizer step's checkpointing kind per decoder layer (after its backward) and the layers each
    logged step coupled (``harc_layers``)."""

    def __init__(self) -> None:
        super().__init__()
        self.kinds: list[list[str]] = []
        self.layers: list[list[int]] = []

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        super().on_pre_optimizer_step(args, state, control, model=model, **kwargs)
        self.kinds.append([checkpointing_kind(layer) for layer in text_decoder(model).layers])

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if logs and "harc_layers" in logs:
            self.layers.append([int(layer) for layer in str(logs["harc_layers"]).split(",")])


@pytest.fixture(scope="module")
def runs(harc_assets: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[StepKinds, dict, str]]:
    """setting -> (the step record, final adapter, printed output) of a 4-step run (refresh at 2, ramp at 3)."""
    from llamafactory.train.tuner import run_exp

    result = {}
    for setting, keys in SETTINGS.items():
        out = tmp_path_factory.mktemp(f"harc_{setting}")
        probe, printed = StepKinds(), io.StringIO()
        recipe = harc_recipe(harc_assets, "llama3", out, max_steps=4, max_grad_norm=0.0, **keys)
        with contextlib.redirect_stdout(printed):
            run_exp(recipe, callbacks=[probe])
        result[setting] = (probe, load_file(str(Path(out) / "adapter_model.safetensors")), printed.getvalue())
    return result


def test_every_layer_runs_the_recipes_checkpointing_through_the_refresh(runs) -> None:
    lines = {setting: next(line for line in printed.splitlines() if "HARC: gradient checkpointing" in line)
             for setting, (_, _, printed) in runs.items()}
    assert lines["default"].endswith(": reentrant (the recipe's) in every decoder layer"), lines
    assert lines["non_reentrant"].endswith(": non-reentrant (the recipe's) in every decoder layer"), lines
    probe = runs["default"][0]
    assert len(probe.kinds) == len(probe.layers) == 4
    assert len({tuple(layers) for layers in probe.layers}) > 1, probe.layers  # the refresh / ramp moved them
    assert all(set(kinds) == {"reentrant"} for kinds in probe.kinds), probe.kinds


def test_harc_training_does_not_depend_on_the_checkpointing(runs) -> None:
    (probe, adapter, _), (other, other_adapter, _) = runs["default"], runs["non_reentrant"]
    grads, other_grads = probe.grads, other.grads
    assert grads.keys() == other_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, other_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    assert adapter.keys() == other_adapter.keys()
    for name, weight in adapter.items():  # after the refresh and the ramp moved the coupled layers
        torch.testing.assert_close(weight, other_adapter[name], rtol=1e-4, atol=1e-6, msg=name)
