"""A scheduler's stop on two ranks (``training/checkpoints.py``): SIGTERM to both ranks of a ``llamafactory-cli train``
torchrun launch mid-run (as SLURM signals every task) saves one whole checkpoint at a step every rank agreed on and
exits 0 with the line saying how to resume; the resume (a launch of its own, as users resume) ends as one process with
gradient accumulation 2 that never stopped (the equality tests/harc/test_harc_stage.py holds two ranks to). Under
ZeRO-2 (plain DDP's resume on two CPU ranks: tests/test_fault_injection.py's DDP chain)."""

from __future__ import annotations

import importlib.util
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from dist_runs import torchrun_cli
from engine_checks import evidence_env
from safetensors.torch import load_file

from conftest import CLI, REPO, harc_recipe, offline_env, processes_marked, read_trainer_log, run_process, run_train
from llamafactory_hera.runtime.whole_checkpoints import MARKER, whole_checkpoints

COMMON = {"harc_eval": False, "max_steps": 6, "save_steps": 1000, "overwrite_output_dir": False}
TERMS = ("loss", "harc_couple", "harc_couple_resp", "harc_kl", "harc_ce")


def _terms(output_dir: Path) -> list[tuple[float, ...]]:
    return [tuple(line[key] for key in TERMS) for line in read_trainer_log(output_dir) if "loss" in line]


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_sigterm_on_both_ranks_saves_a_whole_checkpoint_and_resumes_as_the_run_not_stopped(
        harc_assets: Any, tmp_path: Path) -> None:
    one = tmp_path / "one" / "out"
    run_train(harc_recipe(harc_assets, "llama3", one, **COMMON), tmp_path / "one")
    out, launch = tmp_path / "two" / "out", tmp_path / "two"
    recipe = harc_recipe(harc_assets, "llama3", out, gradient_accumulation_steps=1, **COMMON,
                         deepspeed=str(REPO / "recipes" / "deepspeed" / "ds_z2_config.json"))
    launch.mkdir(parents=True)
    (launch / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    mark = f"{time.time_ns()}"
    env = offline_env(launch, False, ("deepspeed",), FORCE_TORCHRUN="1", NNODES="1", NPROC_PER_NODE="2",
                      HERA_TEST_PREEMPT=mark, **evidence_env(launch / "engine"))
    ended: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: ended.update(proc=run_process(
        [CLI, "train", str(launch / "recipe.yaml")], cwd=launch, env=env, timeout=500)))
    runner.start()
    log = out / "trainer_log.jsonl"
    while runner.is_alive() and not (log.is_file() and log.read_text(encoding="utf-8").strip()):
        time.sleep(0.05)  # the first step logged: the ranks are mid-run
    ranks = [process for process in processes_marked("HERA_TEST_PREEMPT", mark) if "LOCAL_RANK" in process.environ()]
    assert len(ranks) == 2
    for process in ranks:
        process.send_signal(signal.SIGTERM)
    runner.join()
    proc = ended["proc"]
    assert proc.returncode == 0, proc.stderr[-4000:]
    [checkpoint] = whole_checkpoints(out)
    assert (checkpoint / MARKER).is_file() and int(checkpoint.name.split("-")[1]) < 6
    said = [line for line in proc.stdout.splitlines() if "SIGTERM: saved" in line]
    assert said == [f"[llamafactory-hera] SIGTERM: saved the whole checkpoint {out}/{checkpoint.name} and stopped; to "
                    "go on, run the same command again."], proc.stdout[-3000:]
    torchrun_cli({"recipe": {**recipe, "resume_from_checkpoint": True},
                  "env": {"HERA_TEST_ENGINE_EVIDENCE": str(tmp_path / "resumed" / "engine")}}, tmp_path / "resumed")
    got, want = _terms(out), _terms(one)
    assert len(got) == len(want) == 6, (got, want)
    assert all(abs(x - y) <= 2e-5 * max(1.0, abs(x)) for a, b in zip(got, want, strict=True)
               for x, y in zip(a, b, strict=True)), (got, want)
    adapters = [load_file(folder / "adapter_model.safetensors") for folder in (out, one)]
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.allclose(adapters[0][key], adapters[1][key], rtol=0, atol=1e-5) for key in adapters[1])
