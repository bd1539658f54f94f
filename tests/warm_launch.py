"""Launches that cost their work, not their imports: a warm process per pytest worker forks each launch's ranks.

A process a test launches spends 12-14 CPU s importing torch, transformers, LLaMA-Factory and the plugin before its
first line of work; a two-rank torchrun launch pays it three times (torchrun and each rank). :func:`warm_launch`
runs a script (tests/dist_probe.py) as ``python SCRIPT`` or ``torchrun --nproc_per_node N SCRIPT`` would, on ranks
forked from a warm process (tests/warm_server.py) that imported the script's modules once, before any thread or
process group was started. Each rank gets the environment torchrun's agent gives (:func:`torchrun_env`), the
launch's folder and ``sys.argv``; the agent hosts the ranks' TCP store as torchrun's does. Exit code, stdout and
stderr come back as from the subprocess.

What a fresh interpreter decides from the environment at start-up (the plugin's ``.pth`` hook reads
``LLAMAFACTORY_HERA_DISABLE``; the tests' start-up hooks on ``PYTHONPATH`` read ``HERA_TESTS_HIDDEN``, whether
``HERA_TEST_ENGINE_EVIDENCE`` / ``HERA_TEST_FSDP_EVIDENCE`` are set; huggingface_hub, datasets and matplotlib read
``HF_HOME`` / ``MPLCONFIGDIR``; Python reads ``PYTHONUNBUFFERED``) is decided in the warm process with the launch's own
values: a warm process serves only launches whose environment equals the one it was started with, apart from
:data:`READ_AT_RUN_TIME` (values read when the run reads them, after the rank's environment is set),
:data:`LEFT_BY_RUNS` (what in-process runs leave in the test process's environment, read by a run, set or not),
:data:`READ_BY_THE_SCRIPT` (read only after the fork) and
:data:`SHARED_FOLDERS` (a launch gets its warm process's folders: they are in the key otherwise, and every launch
would start a warm process of its own). A launch naming a key of :data:`STARTUP_WITH_RANK` (a start-up hook that acts
on the rank's own variables) is refused: it must be launched for real.

tests/test_warm_launch.py proves a warm launch trains as a real one (same patches, same gradients, losses and adapter
bit for bit). A warm ``accelerate launch`` (:func:`accelerate_launch_env`) gives each rank what accelerate's own
launcher hands torchrun's agent, its variables computed by accelerate's code in the test's process; the test compares
them with a real ``accelerate launch``'s ranks', variable for variable. What the launcher itself does (torchrun's
agent, ``llamafactory-cli train`` under ``FORCE_TORCHRUN``, ``accelerate launch`` and its checks before the ranks, the
fault chains' kills) stays tested by real launches (tests/USER_PATHS.md says which).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import json
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import psutil

SERVER = str(Path(__file__).with_name("warm_server.py"))
# modules tests/dist_probe.py imports, in its order: imported once per warm process
PROBE_MODULES = ("accelerate.state", "torch", "frozen_heap", "llamafactory.train.tuner", "transformers",
                 "transformers.integrations.deepspeed", "llamafactory_hera.heads.architecture",
                 "llamafactory_hera.hera.teacher", "llamafactory_hera.hera.teacher_cache")
# PYTEST_CURRENT_TEST names the test (only transformers' and torch's testing modules read it, which a run does not
# import); the others are folders or marks a run reads when it gets there
# and, where the launch sees DeepSpeed, what the script imports of it at its start (deepspeed_groups_reset)
DEEPSPEED_MODULES = ("deepspeed.comm.comm", "deepspeed.utils.groups")
# the test extra's engines: every warm launch sees them, imported by its warm process (DeepSpeed's modules above, the
# others here). A cold process hides those its run does not use (tests/conftest.py offline_env,
# tests/process_hooks/unused_packages.py) to save their imports, which a warm process pays once; hidden per launch, they
# split the key, and a module of DDP, ZeRO and QLoRA launches started a warm process per engine set. What an install
# without an engine does stays tested by cold processes
ENGINES = ("deepspeed", "bitsandbytes")
ENGINE_MODULES = ("bitsandbytes",)
READ_AT_RUN_TIME = ("LLAMAFACTORY_HERA_CACHE", "HERA_TESTS_LAUNCH", "HERA_TEST_ENGINE_EVIDENCE",
                    "HERA_TEST_FSDP_EVIDENCE", "PYTEST_CURRENT_TEST")
SHARED_FOLDERS = ("HF_HOME", "MPLCONFIGDIR")
# what in-process runs and imports leave in the test process's environment, which every later launch's environment
# copies: LLaMA-Factory's callbacks set WANDB_PROJECT, accelerate's CUDA check PYTORCH_NVML_BASED_CUDA_CHECK, inductor's
# cache TORCHINDUCTOR_CACHE_DIR (its default), all read by a run when it gets there; scikit-learn's and joblib's imports
# set KMP_DUPLICATE_LIB_OK and KMP_INIT_AT_FORK, read by Intel's OpenMP runtime only (torch's is libgomp). Not in the
# key (a worker's warm processes would otherwise split at the first such run); a launch gets its own values
LEFT_BY_RUNS = ("WANDB_PROJECT", "PYTORCH_NVML_BASED_CUDA_CHECK", "TORCHINDUCTOR_CACHE_DIR", "KMP_DUPLICATE_LIB_OK",
                "KMP_INIT_AT_FORK")
# read only by what a launch's script imports or reads after the fork (gradio, which no warm process imports; the
# LlamaBoard probe of tests/hera/test_hera_webui.py): not in the key either
READ_BY_THE_SCRIPT = ("GRADIO_ANALYTICS_ENABLED", "HERA_PROBE_MODEL")
STARTUP_WITH_RANK = ("HERA_TEST_RANK_MARKER",)
# set in a warm process's own environment only (a rank's is the launch's): a start-up hook that patches a rank's
# modules for what each rank reads at run time (tests/fault_injection/) patches the warm process's too
WARM_PROCESS = "HERA_TESTS_WARM_PROCESS"
_SERVERS: dict[tuple, WarmServer] = {}  # least recently used first
MAX_SERVERS = 3  # per worker: each holds about 0.9 GB resident (3 workers share a 2-core, 23 GB machine)
CPU_SECONDS: list[float] = []  # per warm launch of this worker: its agent's and ranks' CPU time
START_CPU_SECONDS: list[float] = []  # per warm process this worker started: the CPU time of its start (its imports)
# per warm process this worker closed: what reaping it added to this process's RUSAGE_CHILDREN that the two lists
# above hold already (its start and every launch it forked; not what it spent serving: its forks, its reads)
CLOSED_CPU_SECONDS: list[float] = []


class WarmServer:
    """One warm process (tests/warm_server.py) with its start-up environment."""

    def __init__(self, env: dict[str, str], modules: tuple[str, ...]) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="hera_warm_"))
        self.env = {**env, **{key: str(self.folder / key.lower()) for key in SHARED_FOLDERS}}
        self.process = subprocess.Popen([sys.executable, SERVER, *modules], env={**self.env, WARM_PROCESS: "1"},
                                        cwd=self.folder,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        start_new_session=True)
        self.read("ready", 600)
        self.start_cpu = sum(psutil.Process(self.process.pid).cpu_times()[:2])
        START_CPU_SECONDS.append(self.start_cpu)

    def read(self, word: str, timeout: float, agent: int | None = None) -> list[str]:
        """The next ``[warm] WORD ...`` line's fields (other lines: what an import printed, skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.process.stdout], [], [], left)[0]:
                if agent is not None:  # the launch and its ranks; the server answers "done" once they are reaped
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(agent, signal.SIGKILL)
                    fields = self.read("done", 60)
                    raise TimeoutError(f"timed out after {timeout:.0f} s (exit {fields[0]}); its ranks were killed")
                raise TimeoutError(f"the warm process said no '{word}' in {timeout:.0f} s")
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"the warm process ended (exit {self.process.wait()}) before '{word}'")
            if line.startswith(f"[warm] {word}"):
                return line.split()[2:]

    def launch(self, script: str, args: list[str], cwd: Path, envs: list[dict[str, str]], store_port: int | None,
               timeout: float) -> tuple[subprocess.CompletedProcess, float]:
        out, err = cwd / ".warm_stdout", cwd / ".warm_stderr"
        for path in (out, err):
            path.write_text("")
        envs = [{**env, **{key: self.env[key] for key in SHARED_FOLDERS}} for env in envs]
        request = {"script": script, "args": args, "cwd": str(cwd), "env": envs, "stdout": str(out),
                   "stderr": str(err), "store_port": store_port}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        agent = int(self.read("pid", 60)[0])
        code, cpu = self.read("done", timeout, agent)
        result = subprocess.CompletedProcess(["warm", script, *args], int(code), out.read_text(), err.read_text())
        return result, float(cpu)

    def close(self) -> None:
        serving = 0.0  # its own CPU time since it was ready, which no list above holds
        with contextlib.suppress(psutil.Error):
            serving = sum(psutil.Process(self.process.pid).cpu_times()[:2]) - self.start_cpu
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        before = _children_cpu()
        self.process.wait()
        CLOSED_CPU_SECONDS.append(max(0.0, _children_cpu() - before - serving))
        shutil.rmtree(self.folder, ignore_errors=True)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def torchrun_env(rank: int, processes: int, port: int) -> dict[str, str]:
    """What torchrun's agent (torch/distributed/elastic/agent/server/local_elastic_agent.py) adds to a rank's
    environment under ``--nproc_per_node N --master_addr 127.0.0.1 --master_port PORT`` on one node."""
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0", "ROLE_RANK": str(rank),
            "ROLE_NAME": "default", "LOCAL_WORLD_SIZE": str(processes), "WORLD_SIZE": str(processes),
            "GROUP_WORLD_SIZE": "1", "ROLE_WORLD_SIZE": str(processes), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "0",
            "TORCHELASTIC_RUN_ID": "none", "TORCHELASTIC_USE_AGENT_STORE": "True",
            "TORCHELASTIC_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT",  # torch/distributed/launcher/api.py
            "TORCH_NCCL_ASYNC_ERROR_HANDLING": os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")}


def accelerate_launch_env(arguments: list[str], env: dict[str, str]) -> tuple[dict[str, str], int, int]:
    """What ``accelerate launch ARGUMENTS SCRIPT`` (e.g. ``["--config_file", "fsdp2.yaml"]``) run with ``env`` adds to
    the environment torchrun's agent gives its ranks, how many ranks it starts and the agent's port: accelerate's own
    parser and ``launch_command`` (accelerate/commands/launch.py: the config merged with the command,
    ``prepare_multi_gpu_env``) run in this process with ``env`` as the environment, up to the call that would start
    the agent (``torch.distributed.run.run``, which is not made). A command accelerate would not hand to torchrun's
    agent on one node (DeepSpeed's launcher, a single process, several machines) is refused: launch it for real."""
    import torch.distributed.run
    from accelerate.commands import launch

    seen: dict = {}

    def agent(args: object) -> None:  # accelerate has set the agent's environment (patch_environment) around it
        seen.update(vars(args), environ=dict(os.environ))

    def not_torchrun(args: object) -> None:
        raise ValueError(f"accelerate launch {' '.join(arguments)}: not a torchrun launch; launch it for real")

    args = launch.launch_command_parser().parse_args([*arguments, "SCRIPT"])
    with mock.patch.dict(os.environ, env, clear=True), mock.patch.object(torch.distributed.run, "run", agent), \
            mock.patch.multiple(launch, simple_launcher=not_torchrun, deepspeed_launcher=not_torchrun,
                                tpu_launcher=not_torchrun, tpu_pod_launcher=not_torchrun,
                                sagemaker_launcher=not_torchrun):
        launch.launch_command(args)
    if seen.get("nnodes") not in ("1", "1:1") or seen.get("standalone"):
        raise ValueError(f"accelerate launch {' '.join(arguments)}: not one node on a fixed port; launch it for real")
    added = {key: value for key, value in seen["environ"].items() if env.get(key) != value}
    return added, int(seen["nproc_per_node"]), int(seen["master_port"])


def start_up_key(env: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """What of ``env`` a warm process decides at its start: a warm process started with one environment serves the
    launches of every environment of the same key."""
    start = {key: value for key, value in env.items() if key not in SHARED_FOLDERS + LEFT_BY_RUNS + READ_BY_THE_SCRIPT}
    for key in READ_AT_RUN_TIME:  # whether it is set may be decided at start-up; its value is read at run time
        if key in start:
            start[key] = "set"
    return tuple(sorted(start.items()))


def server_for(env: dict[str, str], modules: tuple[str, ...] | None = None) -> WarmServer:
    """This worker's warm process for launches of environment ``env`` (started at the first), which imported
    ``modules`` (default: tests/dist_probe.py's, :data:`PROBE_MODULES` and :data:`DEEPSPEED_MODULES`)."""
    if modules is None:  # the engines this stack installs (the oldest stack has no DeepSpeed), unless hidden
        seen = [name for name in ENGINES if name not in env.get("HERA_TESTS_HIDDEN", "").split(",")
                and importlib.util.find_spec(name)]
        modules = PROBE_MODULES + (DEEPSPEED_MODULES if "deepspeed" in seen else ()) + tuple(
            name for name in ENGINE_MODULES if name in seen)
    refused = [key for key in STARTUP_WITH_RANK if key in env]
    if refused:
        raise ValueError(f"{refused}: a start-up hook acts on the rank's variables; launch it for real")
    key = (start_up_key(env), modules)
    server = _SERVERS.pop(key, None)  # put back last: the most recently used
    if server is None or server.process.poll() is not None:
        while len(_SERVERS) >= MAX_SERVERS:  # the least recently used ends
            _SERVERS.pop(next(iter(_SERVERS))).close()
        server = WarmServer(env, modules)
    _SERVERS[key] = server
    return server


def rank_envs(env: dict[str, str], processes: int, port: int, launcher_env: dict[str, str] | None = None,
              ) -> list[dict[str, str]]:
    """Each rank's environment: ``env`` (one process), or ``env`` with what the launcher added (``launcher_env``, e.g.
    :func:`accelerate_launch_env`'s) and torchrun's agent's variables (:func:`torchrun_env`)."""
    if processes == 1:
        return [dict(env)]
    # torchrun sets OMP_NUM_THREADS=1 when it is unset
    return [{"OMP_NUM_THREADS": "1", **env, **(launcher_env or {}), **torchrun_env(rank, processes, port)}
            for rank in range(processes)]


def warm_launch(script: str, args: list[str], *, cwd: Path, env: dict[str, str], processes: int, port: int,
                timeout: float, launcher_env: dict[str, str] | None = None,
                ) -> tuple[subprocess.CompletedProcess, float]:
    """``python SCRIPT ARGS`` (``processes`` 1) or ``torchrun --nproc_per_node N --master_addr 127.0.0.1
    --master_port PORT SCRIPT ARGS`` (with ``launcher_env``: ``accelerate launch``, :func:`accelerate_launch_env`)
    on ranks forked from this worker's warm process; returns the completed process (exit code, stdout and stderr as
    the subprocess's) and the CPU seconds of the launch's processes. A launch past ``timeout`` is killed with its ranks
    and raises AssertionError with what it printed."""
    env = {**env, "HERA_TESTS_HIDDEN": ",".join(name for name in env.get("HERA_TESTS_HIDDEN", "").split(",")
                                                 if name and name not in ENGINES)}  # see ENGINE_MODULES
    server = server_for(env)
    envs = rank_envs(env, processes, port, launcher_env)
    try:
        result, cpu = server.launch(script, args, cwd, envs, port if processes > 1 else None, timeout)
    except TimeoutError as error:
        printed = "\n".join(path.read_text()[-4000:] for path in (cwd / ".warm_stdout", cwd / ".warm_stderr"))
        raise AssertionError(f"warm launch of {script}: {error}:\n{printed}") from None
    CPU_SECONDS.append(cpu)
    return result, cpu


def close_warm_servers() -> None:
    """End this worker's warm processes (before the run checks that nothing it started still runs)."""
    while _SERVERS:
        _SERVERS.popitem()[1].close()


atexit.register(close_warm_servers)
