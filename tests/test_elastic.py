"""Elastic launches (LLaMA-Factory's ``RDZV_ID`` / ``MAX_RESTARTS``, runtime/elastic.py) and torchrun's SIGTERM to a
rank before its steps (runtime/save_signal.py).

A lost rank's restart: two CPU ranks (two nodes of one rank each) of a HARC run under ``MAX_RESTARTS=1``, rank 1
killed once checkpoint-2 is whole; torchrun restarts both ranks, they resume from checkpoint-2 and end as the run never
interrupted: every step's loss and the adapter, bit for bit. Before, the restarted ranks read the previous start's gloo
addresses from the store torch's agent keeps across restarts and died at the process group's start ("Gloo
connectFullMesh failed"), as stock LLaMA-Factory's do.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from dist_runs import launch_runs
from safetensors.torch import load_file

from conftest import CLI, free_port, harc_recipe, offline_env, processes_marked, read_trainer_log, run_process
from llamafactory_hera.runtime import elastic
from llamafactory_hera.runtime.errors import RecipeError
from llamafactory_hera.runtime.run_record import RUN_RECORD
from llamafactory_hera.runtime.whole_checkpoints import MARKER

RUN = {"harc_eval": False, "max_steps": 4, "save_steps": 2, "gradient_accumulation_steps": 1,
       "overwrite_output_dir": False}  # a restart resumes from the output_dir's newest checkpoint


def test_an_elastic_launch_gets_a_store_for_each_start_of_its_ranks() -> None:
    """Under RDZV_ID with restarts possible (MAX_RESTARTS > 0, or a node range) a plugin stage's torchrun gets torch's
    switch set to 1, a value the user set to 1 is kept, another is one line naming it, MAX_RESTARTS and the fix;
    without RDZV_ID, without restarts or for a host stage nothing is set and nothing refused."""
    fixed_nodes = {"RDZV_ID": "job", "MAX_RESTARTS": "0", "MIN_NNODES": "2", "MAX_NNODES": "2"}
    for plain in ({}, {"RDZV_ID": "job"}, fixed_nodes):
        unchanged = dict(plain)
        elastic.store_per_start(True, plain)
        assert plain == unchanged
    host = {"RDZV_ID": "job", "MAX_RESTARTS": "1", elastic.SWITCH: "0"}
    elastic.store_per_start(False, host)  # stock sft with the switch set to 0 by hand: the host's run
    assert host[elastic.SWITCH] == "0"
    stock = {"RDZV_ID": "job", "MAX_RESTARTS": "1"}
    elastic.store_per_start(False, stock)
    assert elastic.SWITCH not in stock
    for env in ({"RDZV_ID": "job", "MAX_RESTARTS": "2"}, {"RDZV_ID": "job", "MIN_NNODES": "1", "MAX_NNODES": "2"}):
        elastic.store_per_start(True, env)
        assert env[elastic.SWITCH] == "1"
    with pytest.raises(RecipeError) as refused:
        elastic.store_per_start(True, {"RDZV_ID": "job", "MAX_RESTARTS": "1", elastic.SWITCH: "0"})
    said = str(refused.value)
    assert said.startswith(f"{elastic.SWITCH}=0 with RDZV_ID=job: torch ") and "MAX_RESTARTS=1" in said, said
    assert said.endswith(f"Unset {elastic.SWITCH} (the plugin then sets it to 1) or set it to 1."), said
    elastic.store_per_start(True, {"RDZV_ID": "job", elastic.SWITCH: "0"})  # never restarts: not refused


@pytest.mark.parametrize(("env", "key"), [
    ({}, "0"),
    ({"TORCHELASTIC_RESTART_COUNT": "1", "TORCHELASTIC_USE_AGENT_STORE": "True"}, "1"),  # the agent's store, kept
    ({"TORCHELASTIC_RESTART_COUNT": "1", "TORCHELASTIC_USE_AGENT_STORE": "False"}, "0"),  # a new store each start
])
def test_the_plugins_keys_name_the_start_only_where_the_store_outlives_it(env: dict[str, str], key: str) -> None:
    assert elastic.start_key(env) == key


BLOCKED = """
import datetime, sys
import torch.distributed as dist
from llamafactory_hera.runtime import save_signal

with save_signal.noting("sigterm"):  # the stage's save signal, noted from its start
    print("blocking", flush=True)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{sys.argv[1]}", rank=0, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
"""


def test_torchruns_sigterm_ends_a_rank_blocked_in_the_process_groups_start_at_once(tmp_path: Path) -> None:
    """A rank of a plugin stage waiting in the process group's start for a peer that never comes (a C call: a Python
    handler runs only once it returns) ends on SIGTERM at once, as stock ranks do. Before, the stage's handler noted
    it and the rank waited on: torchrun's agent killed it 30 s later."""
    with subprocess.Popen([sys.executable, "-c", BLOCKED, str(free_port())], stdout=subprocess.PIPE, text=True,
                          env=offline_env(tmp_path)) as rank:
        assert rank.stdout is not None and rank.stdout.readline().strip() == "blocking"
        time.sleep(1.0)  # in the store's wait for rank 1
        sent = time.monotonic()
        rank.send_signal(signal.SIGTERM)
        try:
            code = rank.wait(timeout=20)
        finally:
            rank.kill()
    assert code == -signal.SIGTERM and time.monotonic() - sent < 5.0, (code, time.monotonic() - sent)


def _losses(out: Path) -> dict[int, float]:
    """Each step's loss, the last logged (a restart logs its steps again from the checkpoint on)."""
    return {line["current_steps"]: line["loss"] for line in read_trainer_log(out) if "loss" in line}


def _kill_node_1_once_checkpoint_2_is_whole(out: Path, mark: str, runners: list[threading.Thread]) -> list[int]:
    killed: list[int] = []
    while all(runner.is_alive() for runner in runners) and not killed:
        time.sleep(0.1)
        if (out / "checkpoint-2" / MARKER).is_file():
            for process in processes_marked("HERA_TEST_ELASTIC", mark):
                if process.environ().get("GROUP_RANK") == "1" and "LOCAL_RANK" in process.environ():
                    process.kill()
                    killed.append(process.pid)
    return killed


def test_a_lost_rank_restarts_and_the_run_ends_as_never_interrupted(harc_assets: Any, tmp_path: Path) -> None:
    """Module doc, on two nodes of one rank each (two ``llamafactory-cli``, ``NNODES=2``): node 1's rank is killed.
    Each node's agent counts its own restarts (node 0's may restart its rank for node 1 without counting): the
    plugin's keys in the store (the watchdog's, the shared-output probe's) must not differ between the nodes of one
    start; before, they did and the restart hung. The restart resumes from checkpoint-2 and the record says
    finished."""
    reference = tmp_path / "reference" / "out"
    launch_runs([{"recipe": harc_recipe(harc_assets, "llama3", reference, **RUN)}], tmp_path / "reference", 2)
    launch, out = tmp_path / "elastic", tmp_path / "elastic" / "out"
    launch.mkdir(parents=True)
    (launch / "recipe.yaml").write_text(yaml.safe_dump(harc_recipe(harc_assets, "llama3", out, **RUN)),
                                        encoding="utf-8")
    mark, port = f"{time.time_ns()}", str(free_port())
    ended: dict[int, subprocess.CompletedProcess] = {}

    def node(rank: int) -> None:
        folder = launch / f"node{rank}"  # each node its own caches, as on two machines
        folder.mkdir()
        env = offline_env(folder, FORCE_TORCHRUN="1", NNODES="2", NODE_RANK=str(rank), NPROC_PER_NODE="1",
                          MASTER_PORT=port, RDZV_ID=f"elastic-{mark}", MAX_RESTARTS="1", HERA_TEST_ELASTIC=mark,
                          PYTHONUNBUFFERED="1")
        ended[rank] = run_process([CLI, "train", str(launch / "recipe.yaml")], cwd=folder, env=env, timeout=500)

    runners = [threading.Thread(target=node, args=(rank,)) for rank in (0, 1)]
    for runner in runners:
        runner.start()
    killed = _kill_node_1_once_checkpoint_2_is_whole(out, mark, runners)
    for runner in runners:
        runner.join()
    printed = "\n".join(ended[rank].stdout + ended[rank].stderr for rank in sorted(ended))
    assert len(killed) == 1 and [ended[rank].returncode for rank in (0, 1)] == [0, 0], printed[-6000:]
    resumed = [line for line in printed.splitlines() if "HARC: resumed directions" in line]
    assert len(resumed) == 1 and resumed[0].endswith(f"from {out}/checkpoint-2"), printed[-6000:]
    assert "connectFullMesh failed" not in printed, printed[-6000:]
    assert json.loads((out / RUN_RECORD).read_text())["status"] == "finished"
    assert _losses(out) == _losses(reference) and len(_losses(reference)) == 4, (_losses(out), _losses(reference))
    got, want = (load_file(folder / "adapter_model.safetensors") for folder in (out, reference))
    assert got.keys() == want.keys() and all(torch.equal(got[key], want[key]) for key in want)
