"""Resuming a HeRA run on another device than the one that wrote the checkpoint.

A GPU run writes ``hera_queue_rank*.pt`` and (under DeepSpeed) ``hera_temperature_optimizer.pt`` with tensors
tagged ``cuda:0``. Here the files are written as such a run writes them (``torch.serialization.location_tag``
answers ``cuda:0`` while HeRA saves them) and the run resumes on this CPU-only machine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import base_recipe
from llamafactory_hera.hera.loss import TemperatureGradHandler
from llamafactory_hera.hera.saved_state import TAU_OPTIMIZER_NAME


@pytest.fixture
def tagged_cuda(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """``torch.save`` of HeRA's own files (``hera_*.pt``) tags their storages ``cuda:0``, as on GPU 0."""
    save = torch.save
    written: list[str] = []

    def save_as_on_gpu(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        if not Path(str(f)).name.startswith("hera_"):
            return save(obj, f, *args, **kwargs)
        written.append(Path(str(f)).name)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
            return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_as_on_gpu)
    return written


@pytest.fixture
def own_tau_optimizer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The temperature with its own AdamW, as under DeepSpeed (whose ZeRO optimizer takes only model parameters)."""
    init = TemperatureGradHandler.__init__

    def with_own(self: TemperatureGradHandler, log_tau: Any, base_lr: float) -> None:
        init(self, log_tau, base_lr)
        self.own_optimizer = torch.optim.AdamW([log_tau], lr=base_lr, weight_decay=0.0)

    monkeypatch.setattr(TemperatureGradHandler, "__init__", with_own)


def test_resume_on_the_cpu_from_files_written_on_gpu0(assets, tmp_path: Path, tagged_cuda: list[str],
                                                      own_tau_optimizer: None) -> None:
    """Before loading onto the CPU: RuntimeError "Attempting to deserialize object on a CUDA device but
    torch.cuda.is_available() is False" at the queue's or the temperature optimizer's ``torch.load``."""
    from llamafactory.train.tuner import run_exp

    common = dict(max_samples=16, per_device_train_batch_size=8, hera_queue_size=8, save_strategy="steps",
                  save_steps=1)
    first = tmp_path / "first"
    run_exp(base_recipe(assets, "qwen2_5_vl", first, max_steps=1, **common))
    checkpoint = first / "checkpoint-1"
    assert set(tagged_cuda) == {TAU_OPTIMIZER_NAME, "hera_queue_rank0.pt"}
    with pytest.raises(RuntimeError, match="CUDA device"):  # the files really name a GPU
        torch.load(checkpoint / "hera_queue_rank0.pt", weights_only=True)
    resumed = tmp_path / "resumed"
    run_exp(base_recipe(assets, "qwen2_5_vl", resumed, max_steps=2, resume_from_checkpoint=str(checkpoint),
                        **common))
    history = json.loads((resumed / "trainer_state.json").read_text())["log_history"]
    step2 = next(entry for entry in history if entry.get("step") == 2 and "hera_loss" in entry)
    assert step2["hera_queue_size"] == 8  # the restored queue (8 samples of step 1) plus this step's batch, capped
    assert step2["hera_temperature"] != pytest.approx(0.07, abs=1e-7)
