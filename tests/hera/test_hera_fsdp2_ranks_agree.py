"""Under FSDP2 and DeepSpeed ZeRO-3 every rank issues the same collectives when only some ranks' micro-batches have a
HeRA term (``hera_gather: false``, text-only micro-batches). The FSDP2 run (two CPU ranks,
``accelerate launch`` of tests/dist_probe.py, which calls run_exp as LLaMA-Factory's launcher.py does, its ranks
forked from the warm process with accelerate's variables, tests/fsdp_checks.py) and the ZeRO-3 run (two torchrun
ranks forked from the warm process, tests/dist_runs.py, every parameter partitioned: HeRA projects through the module
calls) are each compared with a reference run in a SEPARATE launch: two torchrun ranks, plain DDP, without
accelerate's FSDP environment or DeepSpeed. ``llamafactory-cli train`` under torchrun with ZeRO-3 is launched for real
by tests/hera/test_hera_deepspeed_lora.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from dist_runs import launch_runs
from engine_checks import assert_engine, evidence_env, read_evidence, zero3_partitioning_everything
from fsdp_checks import accelerate_launch_runs, assert_fsdp2, fsdp_run
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


def _recipe(assets: Any, data: Path, out: Path, **keys: Any) -> dict[str, Any]:
    return base_recipe(assets, "qwen2_5_vl", out, dataset_dir=str(data), max_steps=2, per_device_train_batch_size=4,
                       disable_shuffling=True, hera_gather=False, hera_monitor_steps=0, ddp_timeout=60, **keys)


def _logged(out: Path) -> list[tuple[float, ...]]:
    return [tuple(line.get(k, 0.0) for k in LOGGED) for line in read_trainer_log(out) if "loss" in line]


@pytest.fixture(scope="module")
def split_runs(assets: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the split dataset's folder, the output folder of its torchrun DDP reference run: rank 1 has no HeRA term)."""
    tmp = tmp_path_factory.mktemp("split")
    data = split_dataset(assets, tmp / "data")
    launch_runs([{"recipe": _recipe(assets, data, tmp / "ddp" / "out")}], tmp / "ddp", 2)
    assert len(_logged(tmp / "ddp" / "out")) == 2 and all(line[2] == 1 for line in _logged(tmp / "ddp" / "out"))
    return data, tmp / "ddp" / "out"


@pytest.mark.parametrize("engine", ["fsdp2", "zero3"])
def test_a_rank_without_a_hera_term_runs_the_same_collectives(assets, split_runs: tuple[Path, Path], engine: str,
                                                              tmp_path: Path) -> None:
    """``hera_gather: false``, rank 0 with a HeRA term at every step, rank 1 with text-only micro-batches: the run
    completes (a collective timeout of 60 s fails a hang fast; an earlier version timed out in the backward's gather
    under FSDP2) and gives the losses and the adapter of torchrun DDP, a launch of its own."""
    if engine == "zero3":
        pytest.importorskip("deepspeed")
    data, reference = split_runs
    out = tmp_path / "out"
    if engine == "fsdp2":
        accelerate_launch_runs([fsdp_run(_recipe(assets, data, out), tmp_path)], tmp_path)
        assert_fsdp2(tmp_path, {"step"})
    else:
        launch_runs([{"recipe": _recipe(assets, data, out, deepspeed=zero3_partitioning_everything(tmp_path)),
                      "env": {"HERA_TEST_ENGINE_EVIDENCE": str(tmp_path / "engine")}}], tmp_path, 2,
                    env=evidence_env(tmp_path / "launch_engine"))
        assert_engine(read_evidence(tmp_path / "engine", ranks=2), 3)
    assert len(_logged(out)) == 2
    for got, want in zip(_logged(out), _logged(reference), strict=True):
        assert got == pytest.approx(want, rel=1e-5)
    got, want = (load_file(folder / "adapter_model.safetensors") for folder in (out, reference))
    assert got.keys() == want.keys() and all(torch.allclose(got[k], want[k], rtol=0, atol=1e-6) for k in want)
