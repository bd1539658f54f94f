"""KV sharing (Gemma 4, Gemma 3n): a layer that reads an earlier layer's keys and values gets them through
transformers' ``shared_kv_states`` dict, not as an input of its checkpointed call. Under reentrant checkpointing
(LLaMA-Factory's default) that gradient is dropped; a reentrant reader of a non-reentrant source fails in backward
("Trying to backward through the graph a second time"). HeRA runs every KV-sharing chain (a source and its readers)
non-reentrant, so its heads may sit anywhere and its gradient is exact.

On the zoo's tiny Gemma 4 (layers sliding, full, full; layer 2 reads layer 1's keys and values), heads in the source
layer 1, LoRA on every linear layer, through the real ``run_exp``, two steps each:
- HeRA with ``hera_lambda: 0`` under the default checkpointing equals SFT with ``use_reentrant_gc: false`` step for
  step (every gradient of both steps, the losses);
- HeRA with ``hera_lambda: 1`` trains and its gradient equals the one without checkpointing;
- stock SFT keeps LLaMA-Factory's behaviour (another gradient) and says so in one line, also on two ranks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
from typing import Any

import pytest
import torch
from dist_runs import launch_runs

from conftest import base_recipe
from llamafactory_hera_testing.zoo import ZOO

RUNS: dict[str, dict[str, Any]] = {
    "hera_lambda0": {"hera_lambda": 0.0},
    "sft_non_reentrant": {"stage": "sft", "use_reentrant_gc": False},
    "sft_default": {"stage": "sft"},
    "hera": {"hera_lambda": 1.0},
    "hera_off": {"hera_lambda": 1.0, "disable_gradient_checkpointing": True},
}
NOTE = ("reentrant gradient checkpointing (use_reentrant_gc: true, LLaMA-Factory's default) drops the gradient that "
        "flows through shared keys and values on this model")


class StepRecord:
    """A ``TrainerCallback``: every trainable parameter's gradient before each optimizer step, and the logged losses."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []
        self.losses: list[float] = []

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.grads.append({name: p.grad.detach().clone() for name, p in model.named_parameters()
                           if p.requires_grad and p.grad is not None})

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))

    def __getattr__(self, name: str) -> Any:  # every other callback event: nothing
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)


@pytest.fixture(scope="module")
def runs(assets, zoo, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[StepRecord, str]]:
    """run -> (its record, its printed output) of two steps on the tiny Gemma 4, heads in the source layer 1."""
    from llamafactory.train.tuner import run_exp

    family = dataclasses.replace(assets, models={"gemma4": zoo("gemma4")},
                                 templates={"gemma4": ZOO["gemma4"][0]})
    result = {}
    for name, keys in RUNS.items():
        record, printed = StepRecord(), io.StringIO()
        recipe = base_recipe(family, "gemma4", tmp_path_factory.mktemp(name), hera_heads=["L1H0"], max_steps=2,
                             logging_steps=1, max_grad_norm=0.0, hera_monitor_steps=0, lora_target="all",
                             learning_rate=1e-2, **keys)
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            run_exp(recipe, callbacks=[record])
        result[name] = (record, printed.getvalue())
    return result


def _assert_same(grads: list[dict[str, torch.Tensor]], other: list[dict[str, torch.Tensor]]) -> None:
    assert len(grads) == len(other) == 2
    for step, (mine, theirs) in enumerate(zip(grads, other, strict=True)):
        assert mine.keys() == theirs.keys() and any("layers.1.self_attn.k_proj" in name for name in mine)
        for name, grad in mine.items():
            torch.testing.assert_close(grad, theirs[name], rtol=1e-5, atol=1e-7, msg=f"step {step + 1}: {name}")


def test_hera_lambda_zero_equals_sft_without_reentrant_checkpointing_step_for_step(runs) -> None:
    (hera, printed), (sft, _) = runs["hera_lambda0"], runs["sft_non_reentrant"]
    _assert_same(hera.grads, sft.grads)
    assert hera.losses == pytest.approx(sft.losses, rel=1e-6, abs=1e-7) and len(hera.losses) == 2
    start = next(line for line in printed.splitlines() if "HeRA: heads" in line)
    assert start.endswith("gradient checkpointing: reentrant (the recipe's) in 1 of 3 decoder layers; non-reentrant in "
                          "layer 1 (HeRA's heads); non-reentrant in layer 2 (keys and values shared: layer 2 reads "
                          "layer 1's)"), start


def test_hera_with_heads_in_a_source_layer_trains_the_exact_gradient(runs) -> None:
    _assert_same(runs["hera"][0].grads, runs["hera_off"][0].grads)
    # the HeRA term is there: its gradient differs from lambda 0's in the heads' layer
    hera, without = runs["hera"][0].grads[0], runs["hera_lambda0"][0].grads[0]
    assert any(not torch.equal(grad, without[name]) for name, grad in hera.items() if "layers.1." in name)


def test_stock_sft_keeps_the_hosts_gradient_and_says_so_in_one_line(runs) -> None:
    (default, printed), (exact, quiet) = runs["sft_default"], runs["sft_non_reentrant"]
    lines = [line for line in printed.splitlines() if NOTE in line]
    assert len(lines) == 1 and "set use_reentrant_gc: false" in lines[0], lines
    assert NOTE not in quiet
    # LLaMA-Factory's own behaviour is kept: the source layer's k/v projections miss the reader's gradient
    first, reference = default.grads[0], exact.grads[0]
    differ = [name for name, grad in first.items() if not torch.allclose(grad, reference[name], rtol=1e-5, atol=1e-7)]
    assert any("layers.1.self_attn.k_proj" in name for name in differ), differ
    assert not any("layers.2." in name for name in differ), differ


def test_stock_sft_says_so_once_on_two_ranks(assets, zoo, tmp_path) -> None:
    """The line comes from the global main process only: one torchrun launch of stock SFT on two ranks (DDP,
    tests/dist_runs.py), one step, prints it once in every rank's output together."""
    family = dataclasses.replace(assets, models={"gemma4": zoo("gemma4")},
                                 templates={"gemma4": ZOO["gemma4"][0]})
    recipe = base_recipe(family, "gemma4", tmp_path / "out", stage="sft", max_steps=1, hera_monitor_steps=0)
    # a real torchrun (not the warm probe): tests/USER_PATHS.md's torchrun path of stock SFT
    printed = launch_runs([{"recipe": recipe}], tmp_path / "launch", 2, warm=False)[0]["stdout"]
    assert printed.count(NOTE) == 1, printed[-3000:]
