"""Jobs across nodes on one shared folder, simulated: each node's run is a plain Python
process (tests/claim_node.py) claiming the folder as a run does, with a host name and a job of its own (the
environment a cluster gives: ``TORCHELASTIC_RUN_ID``, ``MASTER_*``, ``RANK``, ``SLURM_*``), and a lease and a refresh
interval of a fraction of a second where time matters; nothing loads."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llamafactory_hera.runtime import run_claim
from llamafactory_hera.runtime.errors import RecipeError
from llamafactory_hera.runtime.run_claim import CLAIM

NODE = str(Path(__file__).with_name("claim_node.py"))
JOB = {"TORCHELASTIC_RUN_ID": "job-9", "MASTER_ADDR": "node-a", "MASTER_PORT": "29500", "WORLD_SIZE": "2"}
IN_USE = "is in use by another run (process {pid} on host {host}, started "


def _node(folder: Path, host: str, env: dict[str, str] | None = None, **options: float | Path) -> subprocess.Popen:
    """A run on host ``host`` (see claim_node.py for the options), its job from ``env``."""
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("TORCHELASTIC_", "MASTER_", "RANK", "WORLD_SIZE", "SLURM_"))}
    command = [sys.executable, NODE, str(folder), host, *(f"--{k}={v}" for k, v in options.items())]
    return subprocess.Popen(command, env={**base, "PYTHONPATH": os.pathsep.join(sys.path), **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _first_line(node: subprocess.Popen) -> str:
    assert node.stdout is not None
    return node.stdout.readline().strip()


def _claim(folder: Path) -> dict:
    return json.loads((folder / CLAIM).read_text(encoding="utf-8"))


def _stop(tmp_path: Path, name: str) -> Path:
    """A file beside the folder (which must be left empty) whose appearance ends a node's ``--until`` hold."""
    return tmp_path.with_name(f"{tmp_path.name}.{name}")


def _end(node: subprocess.Popen) -> str:
    out, err = node.communicate(timeout=60)
    assert node.returncode in (0, 1), err
    return out


def test_a_live_runs_claim_time_is_refreshed_while_it_runs(tmp_path: Path) -> None:
    """The lease refresher (a thread the claim starts) moves the claim file's time while the run lives: a claim
    left an hour old is fresh again within two refresh intervals. Without it another host takes over a live run's
    folder after the lease."""
    node = _node(tmp_path, "node-a", refresh=0.2, hold=3)
    assert _first_line(node) == "claimed"
    old = time.time() - 3600
    os.utime(tmp_path / CLAIM, (old, old))
    time.sleep(0.8)
    age = time.time() - (tmp_path / CLAIM).stat().st_mtime
    node.kill()
    node.communicate()
    assert age < 0.5, f"the claim was not refreshed: {age:.0f} s old"


def test_a_live_run_is_never_taken_over_however_long_it_runs(tmp_path: Path) -> None:
    """A run on node-a (a lease of 0.25 s, refreshed every 0.05 s) holds the folder until two runs started on node-b
    0.4 s apart (from its second lease on; each start takes a few leases more) have been refused naming it; it ends
    and releases the folder."""
    stop = _stop(tmp_path, "stop")
    holder = _node(tmp_path, "node-a", lease=0.25, refresh=0.05, hold=60, until=stop)
    assert _first_line(holder) == "claimed"
    refused = []
    for _ in range(2):
        time.sleep(0.4)
        refused.append(_end(_node(tmp_path, "node-b", lease=0.25)).strip())
    assert holder.poll() is None, "the holder ended before the second run tried"
    stop.touch()
    _end(holder)
    assert all(IN_USE.format(pid=holder.pid, host="node-a") in line for line in refused), refused
    assert list(tmp_path.iterdir()) == []


def test_a_requeued_job_takes_its_own_stale_claim_over(tmp_path: Path) -> None:
    """Slurm job 42 claims the folder on node-a and is killed (its claim stays, fresh); requeued onto node-b
    (``SLURM_RESTART_COUNT=1``) it takes its own claim over at once, with a line; another job is refused."""
    first = _node(tmp_path, "node-a", {"SLURM_JOB_ID": "42"}, hold=60)
    assert _first_line(first) == "claimed"
    first.send_signal(signal.SIGKILL)
    first.communicate()
    other = _end(_node(tmp_path, "node-b", {"SLURM_JOB_ID": "43"}))
    assert IN_USE.format(pid=first.pid, host="node-a") in other, other
    requeued = _node(tmp_path, "node-b", {"SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "1"}, hold=0.5)
    lines = _end(requeued).splitlines()
    assert lines[0].startswith(f"[llamafactory-hera] output_dir: {tmp_path}: took over the claim of process "
                               f"{first.pid} on host node-a, started "), lines
    assert lines[0].endswith("stage sft, launch 0 of this job (Slurm job 42, now launch 1: requeued)."), lines
    assert lines[1:] == ["claimed"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("pauses", [(0.1, 0.5, 0.75), (0.5, 0.5, 0.5)])
def test_three_jobs_racing_for_one_stale_claim_leave_one_owner(pauses: tuple[float, ...], tmp_path: Path) -> None:
    """A run died on node-a, its claim not refreshed for longer than the lease; three runs meet it at one moment,
    one on node-b (stale: its age) and two on node-a (stale: its process is gone), each paused after each read of the
    claim's files (0.1 s, 0.5 s, 0.75 s: busy nodes; or 0.5 s each, so that all three read the stale claim again
    before any replaces it and the takeover lock alone refuses two). One owns the folder (the claim is its own), the
    other two are refused naming it; no lock is left behind. (Before, a takeover moved the claim aside to check it and
    put back a fresh claim it had moved by mistake; the third run found the folder free meanwhile: two owners.)"""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / CLAIM).write_text(json.dumps({"pid": dead.pid, "host": "node-a", "started": "then", "token": "0"}))
    old = time.time() - run_claim.LEASE_SECONDS - 60
    os.utime(tmp_path / CLAIM, (old, old))
    hosts, go, stop = ("node-b", "node-a", "node-a"), _stop(tmp_path, "go"), _stop(tmp_path, "stop")
    nodes = [_node(tmp_path, host, go=go, hold=60, until=stop, pause=pause)
             for host, pause in zip(hosts, pauses, strict=True)]
    assert [_first_line(node) for node in nodes] == ["ready"] * 3
    go.touch()
    deadline = time.monotonic() + 30  # the owner holds the folder until the other two have ended (refused)
    while sum(node.poll() is not None for node in nodes) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.touch()
    outputs = [_end(node).splitlines() for node in nodes]
    owners = [n for n, lines in enumerate(outputs) if lines[-1] == "claimed"]
    assert len(owners) == 1, outputs
    refusals = [lines[-1] for lines in outputs if lines[-1] != "claimed"]
    named = IN_USE.format(pid=nodes[owners[0]].pid, host=hosts[owners[0]])
    assert len(refusals) == 2 and all(named in line for line in refusals), outputs
    assert list(tmp_path.iterdir()) == []


def test_a_claim_made_by_a_non_zero_rank_lives_until_the_job_ends(tmp_path: Path) -> None:
    """Rank 1 (node-b) claims the folder first; rank 0 (node-a) joins its job's claim; rank 1's run returns and its
    process ends while rank 0 still saves: the claim passes to rank 0 (it names rank 0's process), another job is
    refused meanwhile, and the claim is released when rank 0 ends."""
    stop_1, stop_0 = _stop(tmp_path, "stop1"), _stop(tmp_path, "stop0")
    rank_1 = _node(tmp_path, "node-b", {**JOB, "RANK": "1"}, hold=60, until=stop_1)
    assert _first_line(rank_1) == "claimed"
    rank_0 = _node(tmp_path, "node-a", {**JOB, "RANK": "0"}, hold=60, until=stop_0)
    _first_line(rank_0)
    assert rank_1.poll() is None, "rank 1 ended before rank 0 joined"
    stop_1.touch()
    _end(rank_1)
    assert _claim(tmp_path)["pid"] == rank_0.pid
    with pytest.raises(RecipeError, match=re.escape(IN_USE.format(pid=rank_0.pid, host="node-a"))):
        run_claim.take(tmp_path, "sft", env={})
    stop_0.touch()
    _end(rank_0)
    assert list(tmp_path.iterdir()) == []
