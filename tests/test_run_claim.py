"""One live run per output_dir (patches/.../run_claim.py): two runs into one folder used to both exit 0, the later
one's files over the earlier one's. A live run's claim is held here by a ``sleep`` process (its pid in the claim)
rather than by a second training; every refusal comes before anything loads."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import base_recipe, run_train
from llamafactory_hera.demo.rah import build_rah_recipe
from llamafactory_hera.runtime import run_claim
from llamafactory_hera.runtime.errors import RecipeError
from llamafactory_hera.runtime.run_claim import CLAIM
from llamafactory_hera.runtime.run_record import RUN_RECORD

ONE_STEP = {"max_steps": 1, "max_samples": 16, "overwrite_output_dir": None}
TORCHRUN = {"TORCHELASTIC_RUN_ID": "job-7", "MASTER_ADDR": "node-0", "MASTER_PORT": "29500", "WORLD_SIZE": "4"}


@pytest.fixture
def live_pid() -> Iterator[int]:
    """A live process of this host, standing for the run that holds the folder."""
    sleeper = subprocess.Popen(["sleep", "600"])
    yield sleeper.pid
    sleeper.kill()
    sleeper.wait()


def _dead_pid() -> int:
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    return ended.pid


def _hold(folder: Path, pid: int, host: str | None = None, job: str | None = None) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    claim = {"pid": pid, "host": host or socket.gethostname(), "process_start": None,
             "started": "2026-01-02 03:04:05 UTC", "stage": "sft", "job": job, "token": "0" * 32}
    (folder / CLAIM).write_text(json.dumps(claim), encoding="utf-8")
    return claim


def _error_lines(stderr: str) -> list[str]:
    """The plugin's error lines (a torchrun rank's without its ``[rankN]: `` prefix)."""
    lines = (re.sub(r"^\[rank\d+\]: ", "", line) for line in stderr.splitlines())
    return [line for line in lines if line.startswith("[llamafactory-hera] error: ")]


def test_a_second_run_into_a_live_runs_folder_is_refused_before_loading(assets, live_pid: int,
                                                                        tmp_path: Path) -> None:
    """One line naming the folder, the other run and the ways on, exit code 1, no traceback, nothing loaded, the
    live run's claim and folder untouched (a real torchrun job: :func:`test_a_torchrun_job_shares_its_claim`)."""
    out = tmp_path / "out"
    claim = _hold(out, live_pid)
    proc = run_train(base_recipe(assets, "qwen2_5_vl", out, **ONE_STEP), tmp_path / "run", check=False)
    assert proc.returncode == 1
    assert _error_lines(proc.stderr) == [
        f"[llamafactory-hera] error: output_dir: {out} is in use by another run (process {live_pid} on host "
        f"{socket.gethostname()}, started 2026-01-02 03:04:05 UTC, stage sft); two runs in one folder write over "
        f"each other's files, overwrite_output_dir: true included. Wait for it to end or stop it (kill {live_pid}), "
        "then run the same command again; or set another output_dir."]
    assert "Traceback" not in proc.stderr and "loading weights file" not in proc.stdout + proc.stderr
    assert [path.name for path in out.iterdir()] == [CLAIM]
    assert json.loads((out / CLAIM).read_text()) == claim


def test_overwrite_output_dir_is_refused_too(assets, live_pid: int, tmp_path: Path) -> None:
    """overwrite_output_dir: true would move the live run's files aside."""
    out = tmp_path / "out"
    _hold(out, live_pid)
    (out / "checkpoint-1").mkdir()
    proc = run_train(base_recipe(assets, "qwen2_5_vl", out, **{**ONE_STEP, "overwrite_output_dir": True}),
                     tmp_path / "run", check=False)
    assert proc.returncode == 1
    assert _error_lines(proc.stderr)[0].startswith(f"[llamafactory-hera] error: output_dir: {out} is in use by "
                                                   f"another run (process {live_pid} on host ")
    assert sorted(path.name for path in out.iterdir()) == ["checkpoint-1", CLAIM]


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_the_stock_stages_take_no_claim(stage: str, assets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A plain recipe of LLaMA-Factory's own stages writes nothing of the plugin's into output_dir: its claim, released
    only at exit or on SIGTERM, outlived a SIGUSR1 or SIGKILL (an out-of-memory kill) of a stock run. Through
    ``run_exp`` up to the plugin's first look at the folder after the claim's place (its finished-run check): no claim
    taken, an earlier run's claim left as it was, without a line."""
    from llamafactory.train.tuner import run_exp

    from llamafactory_hera.runtime import output_dir

    class Reached(Exception):
        pass

    def no_claim(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a stock stage's run claimed its output_dir")

    def reached(*args: Any, **kwargs: Any) -> None:
        raise Reached

    out = tmp_path / "out"
    stale = _hold(out, _dead_pid())
    monkeypatch.setattr(run_claim, "take", no_claim)
    monkeypatch.setattr(output_dir, "refuse_finished", reached)
    recipe = {key: value for key, value in base_recipe(assets, "qwen2_5_vl", out, **ONE_STEP).items()
              if not key.startswith("hera_")} | {"stage": stage}
    with pytest.raises(Reached):
        run_exp(recipe)
    assert json.loads((out / CLAIM).read_text()) == stale and "took over" not in capsys.readouterr().out


def test_a_claim_from_another_host_is_live_and_the_line_says_how_to_clear_it(assets, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _hold(out, 12345, host="other-node")
    proc = run_train(base_recipe(assets, "qwen2_5_vl", out, **ONE_STEP), tmp_path / "run", check=False)
    assert proc.returncode == 1
    assert _error_lines(proc.stderr) == [
        f"[llamafactory-hera] error: output_dir: {out} is in use by another run (process 12345 on host other-node, "
        "started 2026-01-02 03:04:05 UTC, stage sft); two runs in one folder write over each other's files, "
        f"overwrite_output_dir: true included. Wait for it to end (if it is no longer running, delete {out / CLAIM}), "
        "then run the same command again; or set another output_dir."]


def test_a_stale_claim_is_taken_over_with_a_line_and_released(assets, tmp_path: Path) -> None:
    """A run killed on this host left its claim: the next run takes it over, says so, and goes on (here to the
    finished-run refusal, which comes after the claim); nothing of its claim is left behind."""
    out = tmp_path / "out"
    dead = _dead_pid()
    _hold(out, dead)
    (out / RUN_RECORD).write_text(json.dumps({"stage": "sft", "status": "finished"}), encoding="utf-8")
    proc = run_train(base_recipe(assets, "qwen2_5_vl", out, **ONE_STEP), tmp_path / "run", check=False)
    assert f"[llamafactory-hera] output_dir: {out}: took over the claim of process {dead} on host " \
        f"{socket.gethostname()}, started 2026-01-02 03:04:05 UTC, stage sft, which is no longer running." \
        in proc.stdout.splitlines()
    assert proc.returncode == 1 and "holds a finished run" in _error_lines(proc.stderr)[0]
    assert [path.name for path in out.iterdir()] == [RUN_RECORD]


def test_a_refused_run_leaves_no_folder_it_made(assets, live_pid: int, tmp_path: Path) -> None:
    out = tmp_path / "new" / "out"
    proc = run_train(base_recipe(assets, "qwen2_5_vl", out, **ONE_STEP, stage="nosuchstage"), tmp_path / "run",
                     check=False)
    assert proc.returncode == 1 and "stage: nosuchstage is not a stage" in _error_lines(proc.stderr)[0]
    assert not (tmp_path / "new").exists()


def test_the_ranks_of_one_job_share_the_claim(tmp_path: Path, live_pid: int, monkeypatch) -> None:
    """Another rank of this job holds the claim (this host or another, a shared folder): this rank goes on without
    a claim of its own; another job's live claim is refused."""
    monkeypatch.setattr(run_claim, "JOB_WAIT_SECONDS", 0)  # no wait for this job to take another host's claim over
    _hold(tmp_path, live_pid, job=run_claim.job_identity(TORCHRUN))
    assert run_claim.take(tmp_path, "hera", env=TORCHRUN) is None
    _hold(tmp_path, 12345, host="other-node", job=run_claim.job_identity(TORCHRUN))
    assert run_claim.take(tmp_path, "hera", env=TORCHRUN) is None
    with pytest.raises(RecipeError, match="is in use by another run"):
        run_claim.take(tmp_path, "hera", env={**TORCHRUN, "TORCHELASTIC_RUN_ID": "job-8"})
    with pytest.raises(RecipeError, match="is in use by another run"):
        run_claim.take(tmp_path, "hera", env={})


def test_a_jobs_identity() -> None:
    """torchrun's run id and master; a loopback master is this host's alone (two single-node jobs on two hosts
    writing to one shared folder are two jobs); a single process has none, whatever MASTER_* the shell exports."""
    assert run_claim.job_identity(TORCHRUN) == "job-7@node-0:29500"
    local = {"TORCHELASTIC_RUN_ID": "none", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "WORLD_SIZE": "2"}
    assert run_claim.job_identity(local) == f"none@{socket.gethostname()}/127.0.0.1:29500"
    assert run_claim.job_identity({"MASTER_ADDR": "node-0", "MASTER_PORT": "1", "WORLD_SIZE": "8"}) == "@node-0:1"
    assert run_claim.job_identity({"MASTER_ADDR": "node-0", "MASTER_PORT": "1"}) is None
    assert run_claim.job_identity({}) is None


def test_one_of_two_runs_started_together_gets_the_claim(tmp_path: Path) -> None:
    mine = run_claim.take(tmp_path, "sft", env={})
    assert mine is not None and json.loads((tmp_path / CLAIM).read_text())["pid"] == os.getpid()
    with pytest.raises(RecipeError, match=f"process {os.getpid()} on host"):
        run_claim.take(tmp_path, "sft", env={})  # a second claim of a live process (this one), another run
    run_claim.release(tmp_path / CLAIM)
    assert list(tmp_path.iterdir()) == []


def test_the_claim_is_released_when_the_process_exits(tmp_path: Path) -> None:
    code = ("import sys; from pathlib import Path; from llamafactory_hera.runtime import run_claim; "
            f"run_claim.take(Path({str(tmp_path)!r}), 'sft'); "
            f"assert (Path({str(tmp_path)!r}) / run_claim.CLAIM).is_file(); sys.exit(3)")
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_torchrun_job_shares_its_claim(assets, tmp_path: Path) -> None:
    """Two ranks (LLaMA-Factory's FORCE_TORCHRUN launch) of a RAH recipe: both go past the claim (one takes it, the
    other shares it) and hold it together through the parse, whose process group waits for both, to RAH's refusal
    of two processes after it (without the sharing one rank is refused as a second run); the claim is released."""
    out = tmp_path / "out"
    proc = run_train({**build_rah_recipe(assets, "qwen2_5_vl", out), **ONE_STEP}, tmp_path / "run", check=False,
                     env={"FORCE_TORCHRUN": "1", "NNODES": "1", "NPROC_PER_NODE": "2"})
    assert proc.returncode != 0
    lines = _error_lines(proc.stderr)  # the rank that fails first ends the other (torchrun), which may not print
    assert lines and all("2 processes: stage: rah runs as one process" in line for line in lines), proc.stderr[-3000:]
    assert "is in use by another run" not in proc.stdout + proc.stderr
    assert not out.exists() or CLAIM not in [path.name for path in out.iterdir()]


def test_an_unreadable_claim_is_taken_over(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / CLAIM).write_text("{not json", encoding="utf-8")
    assert run_claim.take(tmp_path, "sft", env={}) is not None
    assert capsys.readouterr().out == (f"[llamafactory-hera] output_dir: {tmp_path}: took over an unreadable claim "
                                       f"({CLAIM}).\n")
    run_claim.release(tmp_path / CLAIM)
    assert list(tmp_path.iterdir()) == []


def test_of_runs_started_at_once_one_gets_the_folder(tmp_path: Path) -> None:
    """Four processes claim one folder at the same moment (each holds what it got for a second): one gets it, the
    others are refused naming it."""
    code = ("import sys, time; from pathlib import Path; from llamafactory_hera.runtime import run_claim\n"
            "from llamafactory_hera.runtime.errors import RecipeError\n"
            "time.sleep(max(0.0, float(sys.argv[1]) - time.time()))\n"
            f"try:\n    run_claim.take(Path({str(tmp_path)!r}), 'sft', env={{}})\n"
            "except RecipeError as error:\n    print(error)\nelse:\n    print('claimed')\ntime.sleep(1)\n")
    start = str(time.time() + 1.0)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    runs = [subprocess.Popen([sys.executable, "-c", code, start], env=env, stdout=subprocess.PIPE, text=True)
            for _ in range(4)]
    outputs = [run.communicate(timeout=60)[0].strip() for run in runs]
    winners = [run.pid for run, output in zip(runs, outputs, strict=True) if output == "claimed"]
    assert len(winners) == 1, outputs
    assert all(f"is in use by another run (process {winners[0]} on host " in output
               for output in outputs if output != "claimed")
    assert list(tmp_path.iterdir()) == []  # released at the winner's exit


def test_another_hosts_claim_not_refreshed_for_the_lease_is_taken_over(tmp_path: Path, capsys) -> None:
    """A job killed on one node and requeued on another: its claim's time stops moving; after the lease any host
    takes it over, with a line. A live run refreshes its claim's time, so its claim never ages."""
    _hold(tmp_path, 12345, host="other-node")
    old = time.time() - run_claim.LEASE_SECONDS - 60
    os.utime(tmp_path / CLAIM, (old, old))
    mine = run_claim.take(tmp_path, "sft", env={})
    assert mine is not None and json.loads((tmp_path / CLAIM).read_text())["token"] == mine["token"]
    assert "took over the claim of process 12345 on host other-node, started 2026-01-02 03:04:05 UTC, stage sft, " \
           "not refreshed for 11 minutes." in capsys.readouterr().out
    run_claim.release(tmp_path / CLAIM)


def test_a_rank_waits_for_its_job_to_take_another_hosts_stale_claim_over(tmp_path: Path, monkeypatch) -> None:
    """Node B's rank meets a claim written on node A by a run that died there; A's rank finds the process gone and
    takes it over for their job: B's rank waits for that instead of being refused while A's trains (a hang)."""
    import threading

    monkeypatch.setattr(run_claim, "JOB_WAIT_SECONDS", 10)
    _hold(tmp_path, 12345, host="node-a", job="an earlier job")
    takeover = threading.Timer(1.0, _hold, (tmp_path, 23456, "node-a", run_claim.job_identity(TORCHRUN)))
    takeover.start()
    start = time.monotonic()
    assert run_claim.take(tmp_path, "hera", env=TORCHRUN) is None  # shared with node A's rank
    assert 0.9 < time.monotonic() - start < 5
    takeover.join()


def test_sigterm_releases_the_claim(tmp_path: Path) -> None:
    """torchrun stopping the ranks after one failed, a scheduler's time limit: SIGTERM skips atexit, so the claim
    would stay; it is released and the process still ends by the signal."""
    code = ("import os, signal; from pathlib import Path; from llamafactory_hera.runtime import run_claim; "
            f"run_claim.take(Path({str(tmp_path)!r}), 'sft'); "
            f"assert (Path({str(tmp_path)!r}) / run_claim.CLAIM).is_file(); os.kill(os.getpid(), signal.SIGTERM)")
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == -15, proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_forked_child_holds_no_claim_and_sigterm_ends_it_as_before(tmp_path: Path) -> None:
    """A datasets preprocessing worker (``preprocessing_num_workers``) is forked from the run: it holds none of the
    run's claims, and SIGTERM (``Pool.terminate()`` after a worker's error) finds the handler the process had before
    the claim. With the claim's handler inherited, a worker blocked in the pool's queue lock was seen alive with
    SIGTERM caught, and the run hung in the pool's join (2 of 8 real runs of the PNG-in-a-worker refusal, 0 of 10
    after)."""
    code = ("import os, signal, json; from pathlib import Path; "
            "from llamafactory_hera.runtime import run_claim; "
            f"run_claim.take(Path({str(tmp_path)!r}), 'sft'); parent = signal.getsignal(signal.SIGTERM); "
            "pid = os.fork()\n"
            "if pid == 0:\n"
            "    print(json.dumps([signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, len(run_claim._held), "
            "callable(parent)]), flush=True); os._exit(0)\n"
            "os.waitpid(pid, 0)")
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [True, 0, True]  # the parent's handler is the claim's; the child's is not
