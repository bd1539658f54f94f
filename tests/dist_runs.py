"""Several training runs in one launch (tests/dist_probe.py): one process, or one torchrun of N ranks.

Tests that compare engines (DDP, ZeRO-2, ZeRO-3) or a run with its resume need several runs on the same ranks. Each in
its own ``llamafactory-cli`` launch costs the parent, torchrun and each rank's imports again: of a two-rank HARC
launch's 65 CPU s on an idle machine (py-spy, 2026-11-26), 45 are imports. The runs a test compares share a launch;
what users do stays tested as they do it: each engine test resumes in a launch of its own (a new process, as a
user resumes), through ``llamafactory-cli train`` under torchrun (DeepSpeed) or ``accelerate launch`` of
LLaMA-Factory's launcher.py (FSDP2).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from engine_checks import evidence_env
from warm_launch import accelerate_launch_env, warm_launch

from conftest import (
    LAUNCH_ENV,
    engines_of,
    free_port,
    offline_env,
    run_once_more_if_aborted_at_exit,
    run_process,
    run_train,
)

PROBE = str(Path(__file__).with_name("dist_probe.py"))


def launch_runs(runs: list[dict[str, Any]], tmp: Path, processes: int, env: dict[str, str] | None = None,
                launcher: list[str] | None = None, seconds_per_run: int = 240,
                warm: bool | None = None) -> list[dict[str, Any]]:
    """Run each of ``runs`` (``{"recipe": ..., "env": {...}}``, ``env`` optional) one after another in one process
    (``processes`` 1) or one torchrun of ``processes`` ranks (or ``launcher``, e.g. ``accelerate launch --config_file
    ...``), ``env`` set for the whole launch; the process sees the engines any run uses. Each result holds its run's
    first-step gradients and logs (tests/dist_probe.py) and its stdout (rank 0's, and the other ranks' as it came:
    unbuffered, so a rank's line lands in its run's part). Should a rank abort at exit, the launch runs again from
    clean folders (outputs, evidence, feature caches).

    Without ``launcher``, or with ``accelerate launch ...``, the process or the ranks are forked from this worker's
    warm process (tests/warm_launch.py: the same script, environment and ranks' variables, none of the imports) unless
    ``warm`` is False (see :func:`warm_wanted`); the launchers users type run for real in :func:`torchrun_cli`, the
    tests tests/USER_PATHS.md names and tests/test_warm_launch.py."""
    runs = [{"recipe": run["recipe"], "env": run.get("env", {})} for run in runs]
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "runs.json").write_text(json.dumps(runs))
    engines = tuple(sorted({name for run in runs for name in engines_of(run["recipe"])}))
    written = [tmp / "hera_cache", *(Path(folder) for run in runs for key, folder in run["env"].items()
                                     if key.startswith("HERA_TEST_") and key.endswith("_EVIDENCE"))]
    written += [Path(run["recipe"]["output_dir"]) for run in runs if "output_dir" in run["recipe"]]
    options = dict(cwd=tmp, env=offline_env(tmp, False, engines, PYTHONUNBUFFERED="1", **(env or {})),
                   timeout=seconds_per_run * len(runs))
    accelerate = launcher is not None and Path(launcher[0]).name == "accelerate" and launcher[1:2] == ["launch"]
    if warm_wanted(warm) and (launcher is None or accelerate):
        proc = warm_script(PROBE, [str(tmp / "runs.json"), str(tmp / "out.pt")], processes,
                           launcher[2:] if accelerate else None, **options)
    else:
        proc = run_once_more_if_aborted_at_exit(
            [*(launcher or torchrun(processes)), PROBE, str(tmp / "runs.json"), str(tmp / "out.pt")], options,
            lambda: [shutil.rmtree(folder, ignore_errors=True) for folder in written])
    assert proc.returncode == 0, proc.stderr[-5000:]
    results = torch.load(tmp / "out.pt", weights_only=False)
    # rank 0's stdout of each run (what the plugin says once) follows its line "... run I"
    stdouts = re.split(r"^\[dist_probe\] run \d+$", proc.stdout, flags=re.M)[1:]
    assert len(results) == len(stdouts) == len(runs)
    return [{**result, "stdout": stdout} for result, stdout in zip(results, stdouts, strict=True)]


def warm_wanted(warm: bool | None) -> bool:
    """``warm``, or where None, True unless ``HERA_TESTS_REAL_LAUNCHES=1`` (every launch real: to weigh the warm path
    or rule it out)."""
    return os.environ.get("HERA_TESTS_REAL_LAUNCHES") != "1" if warm is None else warm


def warm_script(script: str, args: list[str], processes: int, accelerate: list[str] | None, *, cwd: Path,
                env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """``script args`` on one process or ``processes`` torchrun ranks, or under ``accelerate launch ACCELERATE...``
    (its ranks, port and variables as accelerate gives them), forked from this worker's warm process
    (tests/warm_launch.py); the launch marked as :func:`conftest.run_process` marks one."""
    env = {**env, LAUNCH_ENV: f"{os.getpid()}-{time.time_ns()}"}
    launcher_env, port = None, free_port()
    if accelerate is not None:
        launcher_env, processes, port = accelerate_launch_env(accelerate, env)
    return warm_launch(script, args, cwd=cwd, env=env, processes=processes, port=port, timeout=timeout,
                       launcher_env=launcher_env)[0]


def run_python(script: Path, args: list[str], *, cwd: Path, env: dict[str, str], processes: int = 1,
               timeout: float = 600) -> subprocess.CompletedProcess:
    """``python SCRIPT ARGS`` (or ``torchrun --nproc_per_node PROCESSES ...``) for a script that imports what
    tests/dist_probe.py imports, or less, where the launch itself is not what is tested: forked from this worker's warm
    process (unless :func:`warm_wanted` says otherwise, or the plugin is disabled: a warm process imports the plugin's
    modules), else a real launch. ``PYTHONUNBUFFERED=1`` is added to ``env`` either way: the warm process of
    :func:`launch_runs`' launches of the same environment serves it."""
    env = {**env, "PYTHONUNBUFFERED": "1"}
    if warm_wanted(None) and "LLAMAFACTORY_HERA_DISABLE" not in env:
        return warm_script(str(script), args, processes, None, cwd=cwd, env=env, timeout=timeout)
    return run_process([*torchrun(processes), str(script), *args], cwd=cwd, env=env, timeout=timeout)


def torchrun(processes: int) -> list[str]:
    """``torchrun --nproc_per_node N`` on a free port (``python`` for one process)."""
    return [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", str(processes), "--master_addr",
            "127.0.0.1", "--master_port", str(free_port())] if processes > 1 else [sys.executable]


def torchrun_cli(run: dict[str, Any], tmp: Path, timeout: int = 900) -> dict[str, Any]:
    """One run of the same form as a user launches it: ``llamafactory-cli train`` with ``FORCE_TORCHRUN`` on two
    ranks, in ``tmp``, the run's ``env`` set (its engine evidence written where it names). Returns ``{"stdout": ...}``
    (stdout and stderr) as :func:`launch_runs` does per run; a failed run raises AssertionError."""
    env = {"FORCE_TORCHRUN": "1", "NNODES": "1", "NPROC_PER_NODE": "2", **run.get("env", {})}
    if "HERA_TEST_ENGINE_EVIDENCE" in env:
        env.update(evidence_env(Path(env["HERA_TEST_ENGINE_EVIDENCE"])))
    proc = run_train(run["recipe"], tmp, env=env, timeout=timeout)
    return {"stdout": proc.stdout + proc.stderr}
