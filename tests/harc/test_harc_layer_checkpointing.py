"""Gradient checkpointing per decoder layer under HARC: the coupled layers (whose input residuals the coupling reads)
run non-reentrant, every other layer the recipe's kind (LLaMA-Factory's default: reentrant), through the real
``run_exp``; the switch follows the coupled layers when a refresh or the ramp moves them.

The training must not depend on it: the gradients of the first step and the adapter after the refresh (step 2) and
the ramp (step 3) are the same under the default and under non-reentrant checkpointing everywhere (what the stage
forced on every layer before). The start line says which layers run how.
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
from llamafactory_hera_testing.recipes import harc_recipe

SETTINGS: dict[str, dict[str, Any]] = {
    "default": {},
    "non_reentrant": {"use_reentrant_gc": False},
}


@pytest.fixture(scope="module")
def runs(harc_assets: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict, dict, str]]:
    """setting -> (first gradients, final adapter, printed output) of a 4-step run (refresh at 2, ramp at 3)."""
    from llamafactory.train.tuner import run_exp

    result = {}
    for setting, keys in SETTINGS.items():
        out = tmp_path_factory.mktemp(f"harc_{setting}")
        probe, printed = FirstGradients(), io.StringIO()
        recipe = harc_recipe(harc_assets, "llama3", out, max_steps=4, max_grad_norm=0.0, **keys)
        with contextlib.redirect_stdout(printed):
            run_exp(recipe, callbacks=[probe])
        result[setting] = (probe.grads, load_file(str(Path(out) / "adapter_model.safetensors")), printed.getvalue())
    return result


def test_start_line_says_the_coupled_layers_run_non_reentrant(runs) -> None:
    lines = {setting: next(line for line in printed.splitlines() if "HARC: gradient checkpointing" in line)
             for setting, (_, _, printed) in runs.items()}
    assert "reentrant (the recipe's) in " in lines["default"] and "(HARC's coupled layers)" in lines["default"], lines
    assert lines["non_reentrant"].endswith("non-reentrant (the recipe's) in every decoder layer"), lines


def test_harc_training_does_not_depend_on_the_checkpointing(runs) -> None:
    (grads, adapter, _), (other_grads, other_adapter, _) = runs["default"], runs["non_reentrant"]
    assert grads.keys() == other_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, other_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    assert adapter.keys() == other_adapter.keys()
    for name, weight in adapter.items():  # after the refresh and the ramp moved the coupled layers
        torch.testing.assert_close(weight, other_adapter[name], rtol=1e-4, atol=1e-6, msg=name)
