"""LLaMA-Factory's Ray path (``USE_RAY=1 llamafactory-cli train`` with ``ray_num_workers: 2``): HeRA and HARC train in
Ray's workers exactly as on two torchrun ranks: every value trainer_log.jsonl and the method's record log, and every
tensor of the adapter, are equal; so does a stock LoRA SFT recipe with the plugin live. A run that Ray ends (a worker
failed, the driver interrupted) is recorded as ended, never left ``running``: Ray kills the rank that writes the
record, the driver records it (ray_driver.py).

On a CPU the workers are scheduled through the test-only shim of tests/ray_cpu/ (LLaMA-Factory asks 10 CPUs per
worker). The runs share one Ray cluster, started once for the module (a Ray start costs several CPU seconds on a
2-core machine) and joined by each run through the recipe's ``ray_init_kwargs: {address: ...}``, as a user joins the
cluster of ``ray start --head``; ``master_addr`` is given so LLaMA-Factory does not ask Ray's state API (ray[default])
for the head's address. The cluster is shut down at the module's end, and none of its processes outlives it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from dist_runs import launch_runs
from safetensors.torch import load_file

from conftest import (
    CLI,
    base_recipe,
    harc_recipe,
    offline_env,
    processes_marked,
    read_trainer_log,
    run_train,
    still_running,
)
from llamafactory_hera.runtime import run_record
from llamafactory_hera_patches import ray_driver

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is in the test extra (.[test])")

RAY_HOOK = Path(__file__).resolve().parent / "ray_cpu"
CLUSTER_CPUS = 2  # the shim asks one CPU per worker: two workers
CLUSTER_MARK = "HERA_TEST_RAY_CLUSTER"  # in the environment of every process of the cluster (inherited)
STARTS = 3  # Ray's raylet gives its agents 15 s to start; on a loaded machine one start may miss that
# the head: Ray's cluster of this module, until the test closes its stdin
HEAD = ("import sys, ray\n"
        "ray.init(num_cpus=int(sys.argv[1]), include_dashboard=False, _temp_dir=sys.argv[2])\n"
        "print(ray.get_runtime_context().gcs_address, ray.util.get_node_ip_address(), flush=True)\n"
        "sys.stdin.read()\n"
        "ray.shutdown()\n")
CLOCK = ("elapsed_time", "remaining_time", "throughput")  # wall-clock values of trainer_log.jsonl
RECORDS = {"hera": "hera_run.json", "harc": "harc_run.json"}


def _ray_env() -> dict[str, str]:
    """Every Ray process of the test: the CPU shim, no usage report, no token written to ``~/.ray`` (Ray 2.60's
    token authentication writes one there for a cluster it starts)."""
    return {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(RAY_HOOK)}


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """A two-CPU Ray cluster on this machine: its address and its node's IP address (Ray's name for this machine,
    which LLaMA-Factory requires ``master_addr`` to be); every process of it ended afterwards."""
    logs = tmp_path_factory.mktemp("ray_head")
    # Ray's socket paths must stay short (107 characters): not under pytest's deep temporary folder
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    mark = f"{os.getpid()}-{time.time_ns()}"
    env = offline_env(logs, **_ray_env(), **{CLUSTER_MARK: mark})
    head = None
    address: list[str] = []
    try:
        for start in range(STARTS):
            with (logs / f"head{start}.log").open("w") as log:
                head = subprocess.Popen([sys.executable, "-c", HEAD, str(CLUSTER_CPUS), str(temp)], cwd=logs, env=env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                                        start_new_session=True)
            address = head.stdout.readline().split()  # none once ray.init failed and the head exited
            if address:
                break
            head.wait()
            _end_cluster(mark)
        assert address, (logs / f"head{STARTS - 1}.log").read_text()[-4000:]
        yield address
    finally:
        if head is not None and head.poll() is None:
            head.stdin.close()
            try:
                head.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(head.pid, signal.SIGKILL)
        left = _end_cluster(mark)
        shutil.rmtree(temp, ignore_errors=True)
        assert not left, f"Ray processes outlived the cluster: {left}"


def _end_cluster(mark: str) -> list[str]:
    """Waits for the cluster's processes to end (a minute), kills those left; returns their command lines."""
    import psutil  # as conftest does: not at the collection of every module

    left = still_running(processes_marked(CLUSTER_MARK, mark), timeout=60)
    names = []
    for process in left:
        with contextlib.suppress(psutil.Error):
            names.append(" ".join(process.cmdline())[:200])
            process.kill()
    return names


def _recipe_keys(ray_cluster: list[str]) -> dict[str, Any]:
    """What a recipe adds to train under Ray in the module's cluster, on two workers."""
    address, node = ray_cluster
    return {"ray_num_workers": 2, "ray_init_kwargs": {"address": address}, "master_addr": node}


def _logged(output_dir: Path) -> list[dict[str, Any]]:
    """trainer_log.jsonl without its wall-clock values."""
    return [{key: value for key, value in line.items() if key not in CLOCK} for line in read_trainer_log(output_dir)]


def _adapter(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "adapter_model.safetensors")


def _stock_sft(harc_assets: Any, output_dir: Path) -> dict[str, Any]:
    """A plain LoRA SFT recipe on the tiny Llama-3 (what two torchrun ranks train as without the plugin:
    tests/test_stock_stages_distributed.py)."""
    return {"model_name_or_path": str(harc_assets.models["llama3"]), "template": harc_assets.templates["llama3"],
            "stage": "sft", "do_train": True, "finetuning_type": "lora", "lora_target": "all",
            "dataset": "harc_harmless", "dataset_dir": str(harc_assets.dataset_dir), "cutoff_len": 64,
            "per_device_train_batch_size": 2, "max_steps": 2, "logging_steps": 1, "learning_rate": 1e-3,
            "save_strategy": "no", "output_dir": str(output_dir), "overwrite_output_dir": True, "report_to": "none",
            "plot_loss": False, "seed": 0, "disable_shuffling": True, "overwrite_cache": True}


def _record(output_dir: Path, method: str) -> dict[str, Any]:
    """The method's record, its run folder named alike wherever the run wrote it."""
    text = (output_dir / RECORDS[method]).read_text(encoding="utf-8")
    return json.loads(text.replace(json.dumps(str(output_dir))[1:-1], "OUTPUT_DIR"))


@needs_ray
def test_hera_harc_and_stock_sft_train_in_rays_workers_as_on_two_torchrun_ranks(
        ray_cluster: list[str], assets: Any, harc_assets: Any, tmp_path: Path) -> None:
    """Each recipe through ``USE_RAY=1 llamafactory-cli train`` on two workers, then all three in one launch of two
    torchrun ranks (warm probe): the same logged values, method records and adapter tensors."""
    recipes = {
        "hera": lambda out: base_recipe(assets, "qwen2_5_vl", out, max_steps=2, save_strategy="no"),
        "harc": lambda out: harc_recipe(harc_assets, "llama3", out, max_steps=3, harc_eval=False,
                                        save_strategy="no"),
        "sft": lambda out: _stock_sft(harc_assets, out),
    }
    for method, recipe in recipes.items():
        proc = run_train({**recipe(tmp_path / "ray" / method), **_recipe_keys(ray_cluster)},
                         tmp_path / "ray_run" / method, env={"USE_RAY": "1", **_ray_env()}, timeout=900)
        assert "Using ray.remote mode with 2 workers" in proc.stdout + proc.stderr
    launch_runs([{"recipe": recipe(tmp_path / "torchrun" / method)} for method, recipe in recipes.items()],
                tmp_path / "torchrun_launch", 2)
    for method in recipes:
        ray_out = tmp_path / "ray" / method
        torchrun_out = tmp_path / "torchrun" / method
        assert _logged(ray_out) == _logged(torchrun_out), method
        assert any("loss" in line for line in _logged(ray_out)), method
        if method in RECORDS:
            assert _record(ray_out, method) == _record(torchrun_out, method), method
            assert run_record.read_record(ray_out / run_record.RUN_RECORD)["status"] == run_record.FINISHED
        else:  # a plain recipe's folder holds only what LLaMA-Factory writes
            assert not (ray_out / run_record.RUN_RECORD).exists()
        adapters = [_adapter(out) for out in (ray_out, torchrun_out)]
        assert adapters[0].keys() == adapters[1].keys(), method
        assert all(torch.equal(adapters[0][key], adapters[1][key]) for key in adapters[0]), method


@needs_ray
def test_a_ray_driver_interrupted_records_the_run_failed(ray_cluster: list[str], assets: Any, tmp_path: Path) -> None:
    """Ctrl-C to ``llamafactory-cli train`` under Ray once the run is recorded ``running``: Ray kills the workers, the
    rank that writes the record among them, and the driver records the run ``failed`` by the interrupt; where that
    rank outlived the other long enough to fail in a collective, it recorded its own error first (seen once in 6)."""
    out = tmp_path / "out"
    recipe = {**base_recipe(assets, "qwen2_5_vl", out, max_steps=1000, save_strategy="no"), **_recipe_keys(ray_cluster)}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    driver = subprocess.Popen([CLI, "train", str(tmp_path / "recipe.yaml")], cwd=tmp_path,
                              env=offline_env(tmp_path, USE_RAY="1", **_ray_env()), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 600  # a bound for a driver that hangs, not a timing under test
        while run_record.read_record(out / run_record.RUN_RECORD).get("status") != run_record.RUNNING:
            assert driver.poll() is None, driver.stderr.read()[-4000:]
            assert time.monotonic() < deadline, "the run was not recorded running in 10 minutes"
            time.sleep(0.5)
        driver.send_signal(signal.SIGINT)
        stderr = driver.communicate(timeout=300)[1]
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    record = run_record.read_record(out / run_record.RUN_RECORD)
    assert driver.returncode != 0 and "KeyboardInterrupt" in stderr
    # the driver's KeyboardInterrupt, or the rank's error in a collective (gloo's RuntimeError, DistBackendError)
    assert record["status"] == run_record.FAILED and record["error"], record


class _TaskError(Exception):
    """Ray's RayTaskError as the driver gets it: a worker's exception wrapped, the worker's own as ``cause``."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"ray::Worker._training_function() (pid=1, ip=10.0.0.1)\n  {cause!r}")
        self.cause = cause


def _started(output_dir: Path, stage: str = "hera") -> Path:
    """The record a rank writes after the parse: ``running``."""
    return run_record.write_started(output_dir, stage, {"output_dir": str(output_dir)}, marks=True)


def _raising(error: BaseException, before: Callable[[], None] = lambda: None) -> Callable[[Any, Any], None]:
    """A stand-in for LLaMA-Factory's ``_ray_training_function`` whose ``ray.get`` raises ``error``."""

    def host(ray_args: Any, config: dict[str, Any]) -> None:
        before()
        raise error
    return host


@pytest.mark.parametrize("error, line", [
    (_TaskError(ValueError("rank 1 ran out of data")), "ValueError: rank 1 ran out of data"),
    (KeyboardInterrupt(), "KeyboardInterrupt"),
], ids=["worker_failed", "driver_interrupted"])
def test_the_driver_records_a_run_ray_ended_as_failed(tmp_path: Path, error: BaseException, line: str) -> None:
    """The rank's record still says ``running`` when the driver's ``ray.get`` raises: failed, with the worker's own
    error (not Ray's wrapper), in the method's record too."""
    args = {"stage": "hera", "output_dir": str(tmp_path)}

    def stage_starts() -> None:  # rank 0's stage, in a worker, after the driver started
        _started(tmp_path)
        (tmp_path / RECORDS["hera"]).write_text(json.dumps({"status": "running"}), encoding="utf-8")

    with pytest.raises(type(error)):
        ray_driver.ray_training_function(_raising(error, stage_starts), None, {"args": args})
    record = run_record.read_record(tmp_path / run_record.RUN_RECORD)
    assert record["status"] == run_record.FAILED and record["error"] == line
    assert run_record.read_record(tmp_path / RECORDS["hera"]) == {"status": "failed", "error": line}


def test_the_driver_leaves_a_record_its_rank_ended_or_an_older_runs(tmp_path: Path) -> None:
    """A record its rank ended keeps the rank's word; a record older than the driver's start (another run's, left
    ``running`` before) is not this run's to end; a run that returns is left to its rank."""
    ended = tmp_path / "ended"
    older = tmp_path / "older"
    finished = tmp_path / "finished"
    run_record.write_ended(_started(ended), ValueError("the rank's own error"))
    _started(older)
    for folder, host in ((ended, _raising(KeyboardInterrupt())), (older, _raising(KeyboardInterrupt())),
                         (finished, lambda ray_args, config: _started(finished))):
        with contextlib.suppress(KeyboardInterrupt):
            ray_driver.ray_training_function(host, None, {"args": {"stage": "hera", "output_dir": str(folder)}})
    assert run_record.read_record(ended / run_record.RUN_RECORD)["error"] == "ValueError: the rank's own error"
    assert run_record.read_record(older / run_record.RUN_RECORD)["status"] == run_record.RUNNING
    assert run_record.read_record(finished / run_record.RUN_RECORD)["status"] == run_record.RUNNING
