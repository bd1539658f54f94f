"""A warm launch (tests/warm_launch.py) runs what a real launch runs: the same patches, the same training."""

from __future__ import annotations

import json
import os
import resource
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch
import warm_launch
import warm_server
import yaml
from dist_runs import launch_runs
from fsdp_checks import fsdp2_config_file
from torch._inductor.runtime.cache_dir_utils import default_cache_dir
from warm_launch import (
    _SERVERS,
    CPU_SECONDS,
    WARM_PROCESS,
    WarmServer,
    accelerate_launch_env,
    close_warm_servers,
    rank_envs,
    server_for,
    start_up_key,
)

from conftest import LAUNCH_ENV, base_recipe, offline_env, run_process

WRITE_ENVIRONMENT = """import json, os, sys
with open(os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.json"), "w") as out:
    json.dump(dict(os.environ), out)
"""


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def test_a_warm_two_rank_launch_trains_as_a_real_torchrun_launch(assets, tmp_path: Path, capsys) -> None:
    """One real torchrun launch and one warm launch of the same tiny two-rank HeRA LoRA recipe (launches needed: the
    warm path is compared with the real one): the plugin patched the same host modules with the same functions on
    rank 0, and the first-step gradients (LoRA: their norm), every logged value and the saved adapter are equal bit
    for bit. Prints the
    CPU seconds of each (the real launch's processes; the warm launch's and, once per worker, its warm process's)."""
    def run(name: str, warm: bool) -> dict:
        recipe = base_recipe(assets, "qwen2_5_vl", tmp_path / name / "out", max_steps=2, save_steps=2)
        return launch_runs([{"recipe": recipe}], tmp_path / name, 2, warm=warm)[0]

    before = _children_cpu()
    real = run("real", False)
    real_cpu = _children_cpu() - before
    close_warm_servers()  # a warm process of its own, to measure its start
    warm = run("warm", True)
    server = next(iter(_SERVERS.values()))
    startup = psutil.Process(server.process.pid).cpu_times()
    assert real["patches"] == warm["patches"]
    assert {"llamafactory.train.tuner", "llamafactory.data.template"} <= set(warm["patches"])
    assert real["grads"].keys() == warm["grads"].keys()  # LoRA: o_proj's frozen weight has none; the norm is logged
    for layer, grad in real["grads"].items():
        assert torch.equal(grad, warm["grads"][layer]), layer
    assert real["logs"] == warm["logs"] and all({"loss", "grad_norm"} <= set(log) for log in real["logs"])
    adapters = [(tmp_path / name / "out" / "adapter_model.safetensors").read_bytes() for name in ("real", "warm")]
    assert adapters[0] == adapters[1]
    second = launch_runs([{"recipe": base_recipe(assets, "qwen2_5_vl", tmp_path / "again" / "out", max_steps=2,
                                                 save_steps=2)}], tmp_path / "again", 2)[0]
    assert second["logs"] == real["logs"]  # a warm process serves launch after launch unchanged
    with capsys.disabled():
        print(f"\n[cpu] real torchrun launch {real_cpu:.1f} s; warm launches {CPU_SECONDS[-2]:.1f} and "
              f"{CPU_SECONDS[-1]:.1f} s; warm process start {startup.user + startup.system:.1f} s")


def test_a_warm_accelerate_launch_gives_each_rank_the_environment_of_a_real_one(tmp_path: Path) -> None:
    """A real ``accelerate launch --config_file`` of the FSDP2 config the tests use (tests/fsdp_checks.py) of a script
    that writes its environment (a launch needed: the real launcher's ranks are what the warm path is compared with;
    the ranks import nothing heavy): each rank's environment is the one a warm launch gives it, variable for variable
    (accelerate's, torchrun's agent's and the test's), but for the launch's mark and two that torchrun's agent sets for
    its own bookkeeping: the file a rank writes its error to (a folder of the agent's), and the inductor cache folder
    the launching process set when accelerate imported it (its default, which a rank computes for itself)."""
    config = fsdp2_config_file(tmp_path, mixed_precision="bf16")
    env = offline_env(tmp_path)
    (tmp_path / "environment.py").write_text(WRITE_ENVIRONMENT, encoding="utf-8")
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    proc = run_process([accelerate, "launch", "--config_file", str(config), str(tmp_path / "environment.py"),
                        str(tmp_path)], cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    added, processes, port = accelerate_launch_env(["--config_file", str(config)], env)
    assert (processes, port) == (2, yaml.safe_load(config.read_text())["main_process_port"])
    assert {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "ACCELERATE_MIXED_PRECISION": "bf16"}.items() \
        <= added.items()
    for rank, want in enumerate(rank_envs(env, processes, port, added)):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got.pop("TORCHELASTIC_ERROR_FILE").endswith(f"/{rank}/error.json")
        assert got.pop("TORCHINDUCTOR_CACHE_DIR") == want.pop("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
        assert got.pop(LAUNCH_ENV)
        assert got == want


def test_an_accelerate_launch_torchruns_agent_would_not_run_is_not_warmed(tmp_path: Path) -> None:
    """One process (accelerate's simple launcher, no agent): refused before anything starts, to be launched for
    real."""
    with pytest.raises(ValueError, match="not a torchrun launch; launch it for real"):
        accelerate_launch_env(["--num_processes", "1", "--cpu"], offline_env(tmp_path))


def test_what_in_process_runs_leave_in_the_environment_starts_no_other_warm_process(tmp_path: Path) -> None:
    """LLaMA-Factory's WANDB_PROJECT, accelerate's PYTORCH_NVML_BASED_CUDA_CHECK, inductor's TORCHINDUCTOR_CACHE_DIR
    and scikit-learn's KMP_* variables, left in the test process's environment by in-process runs and imports (each
    seen splitting a worker's warm processes), are copied into every later launch's: the same warm process serves it.
    What a start-up hook reads (LLAMAFACTORY_HERA_DISABLE) still keeps them apart."""
    env = offline_env(tmp_path)
    left = {**env, "WANDB_PROJECT": "llamafactory", "PYTORCH_NVML_BASED_CUDA_CHECK": "1",
            "TORCHINDUCTOR_CACHE_DIR": "/tmp/torchinductor_root", "KMP_DUPLICATE_LIB_OK": "True",
            "KMP_INIT_AT_FORK": "FALSE"}
    assert start_up_key(left) == start_up_key(env)
    assert start_up_key({**env, "LLAMAFACTORY_HERA_DISABLE": "1"}) != start_up_key(env)


def test_a_worker_keeps_its_most_recently_used_warm_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    """At most MAX_SERVERS warm processes a worker: starting another ends the least recently used (a stand-in for the
    warm process: nothing starts)."""
    closed = []

    class Server:
        def __init__(self, env: dict[str, str], modules: tuple[str, ...]) -> None:
            self.env, self.process = env, SimpleNamespace(poll=lambda: None)

        def close(self) -> None:
            closed.append(self.env["N"])

    monkeypatch.setattr(warm_launch, "WarmServer", Server)
    monkeypatch.setattr(warm_launch, "_SERVERS", {})
    monkeypatch.setattr(warm_launch, "MAX_SERVERS", 2)
    first = server_for({"N": "1"}, ())
    server_for({"N": "2"}, ())
    assert server_for({"N": "1"}, ()) is first  # served again: now the most recently used
    server_for({"N": "3"}, ())
    assert closed == ["2"] and [server.env["N"] for server in warm_launch._SERVERS.values()] == ["1", "3"]


def test_the_warm_process_refuses_to_fork_beside_a_thread() -> None:
    """fork copies the calling thread only: with another thread running the warm process refuses to serve."""
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        with pytest.raises(SystemExit, match="not safe to fork"):
            warm_server.one_thread()
    finally:
        stop.set()
        thread.join()


def test_a_launch_whose_start_up_hook_reads_the_rank_is_refused() -> None:
    """tests/process_hooks/sitecustomize.py marks a rank at start-up from RANK: a warm process never sees it."""
    with pytest.raises(ValueError, match="HERA_TEST_RANK_MARKER"):
        server_for({"HERA_TEST_RANK_MARKER": "/tmp/x"})


def test_a_warm_process_is_marked_and_its_ranks_are_not(tmp_path: Path) -> None:
    """The warm process's own environment holds WARM_PROCESS, a rank's the launch's alone; the fault hook
    (tests/fault_injection/) on ``PYTHONPATH`` installs its patches in the warm process as in a rank, so a rank forked
    from it has them (a reference run with the hook's teacher rows). A warm process importing nothing: well under 1 CPU
    s."""
    script = ("import os, sys\nfinders = [getattr(f, 'patches', {}) for f in sys.meta_path]\nprint("
              "os.environ.get('HERA_TESTS_WARM_PROCESS'), any('llamafactory.model.loader' in f for f in finders))\n")
    (tmp_path / "marked.py").write_text(script)
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(Path(__file__).with_name("fault_injection"))}
    server = WarmServer(env, ())
    try:
        assert psutil.Process(server.process.pid).environ()[WARM_PROCESS] == "1"
        result, _ = server.launch(str(tmp_path / "marked.py"), [], tmp_path, [env], None, 60)
    finally:
        server.close()
    assert (result.returncode, result.stdout) == (0, "None True\n"), result.stderr
