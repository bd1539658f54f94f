"""Under FSDP2 every rank issues the same collectives when only some ranks' micro-batches have a HeRA term
(``hera_gather: false``, text-only micro-batches): issue 69 item 2. The FSDP2 run (two CPU ranks, ``accelerate
launch`` of LLaMA-Factory's launcher.py, tests/fsdp_checks.py) is compared with a reference run in a SEPARATE launch:
``llamafactory-cli train`` under torchrun, plain DDP, without accelerate's FSDP environment."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from dist_runs import torchrun_cli
from fsdp_checks import accelerate_launch, assert_fsdp2
from safetensors.torch import load_file

from conftest import base_recipe, read_trainer_log

LOGGED = ("loss", "lm_loss", "hera_batches_without_term")


def split_dataset(assets: Any, folder: Path) -> Path:
    """A copy of the tiny dataset folder whose ``hera_demo`` rows alternate, four by four, between image rows and
    text-only rows: read in order (``disable_shuffling``) by two ranks at 4 rows each, rank 0's micro-batches all
    have images (a HeRA term) and rank 1's none (LM loss only)."""
    shutil.copytree(assets.dataset_dir, folder)
    rows = json.loads((folder / "hera_demo.json").read_text())
    for index, row in enumerate(rows):
        if index // 4 % 2:
            row["images"] = []
            row["messages"][0]["content"] = row["messages"][0]["content"].replace("<image>", "")
    (folder / "hera_demo.json").write_text(json.dumps(rows))
    return folder


def test_a_rank_without_a_hera_term_runs_the_same_collectives(assets, tmp_path: Path) -> None:
    """``hera_gather: false``, rank 0 with a HeRA term at every step, rank 1 with text-only micro-batches: the FSDP2
    run completes (a collective timeout of 60 s fails a hang fast; 4d19032's code timed out in the backward's
    gather) and gives the losses and the adapter of torchrun DDP, a launch of its own."""
    data = split_dataset(assets, tmp_path / "data")
    runs = {name: base_recipe(assets, "qwen2_5_vl", tmp_path / name / "out", dataset_dir=str(data), max_steps=2,
                              per_device_train_batch_size=4, disable_shuffling=True, hera_gather=False,
                              hera_monitor_steps=0, ddp_timeout=60) for name in ("fsdp2", "ddp")}
    accelerate_launch(runs["fsdp2"], tmp_path / "fsdp2", timeout=600)
    torchrun_cli({"recipe": runs["ddp"]}, tmp_path / "ddp", timeout=600)
    assert_fsdp2(tmp_path / "fsdp2", {"step"})
    logged = {name: [tuple(line.get(k, 0.0) for k in LOGGED) for line in read_trainer_log(tmp_path / name / "out")
                     if "loss" in line] for name in runs}
    assert len(logged["fsdp2"]) == 2 and all(line[2] == 1 for line in logged["ddp"]), logged  # rank 1: no term
    for got, want in zip(logged["fsdp2"], logged["ddp"], strict=True):
        assert got == pytest.approx(want, rel=1e-5)
    got, want = (load_file(tmp_path / name / "out" / "adapter_model.safetensors") for name in ("fsdp2", "ddp"))
    assert got.keys() == want.keys() and all(torch.allclose(got[k], want[k], rtol=0, atol=1e-6) for k in want)
