"""Two nodes of a SLURM job on one machine, started as recipes/slurm/hera_2nodes.sbatch starts them (docs/multinode.md):
``recipes/slurm/node.sh`` once per node, each in its own UTS and PID namespace (its own host name) with its own HOME,
caches and TMPDIR, ``output_dir`` shared, one CPU rank per node. The job's first start freezes node 1 in a step
(its rank SIGSTOPped by tests/fault_injection/, then every process of that node): node 0 ends the job with the
watchdog's line naming rank 1 on node1, within the bound. The requeue, the SAME command on both nodes, resumes from the
newest whole checkpoint and finishes with the adapter of the run never stopped (its reference: one launch of the same
run on two ranks of one node, tests/faults.py).

A launch of its own: two torchrun agents rendezvousing across namespaces, a frozen node and the requeue are what no
in-process test has."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from faults import HOOK, ROWS, fault_env, launch, recipe

from conftest import LAUNCH_ENV, free_port, offline_env, processes_marked
from llamafactory_hera.training import watchdog
from llamafactory_hera_testing.resume import differences, model_tensors

ROOT = Path(__file__).resolve().parents[1]
NODE_SH = ROOT / "recipes" / "slurm" / "node.sh"
BOUND = 20  # hera_watchdog_timeout of the test's job: seconds


def machine_address() -> str | None:
    """This machine's first IPv4 address other than loopback: the job's MASTER_ADDR, as a cluster's first node has
    (a loopback master is a job of one host: each node's ranks would take the other's for another job)."""
    found = [address.address for name, addresses in psutil.net_if_addrs().items() if name != "lo"
             for address in addresses if address.family == socket.AF_INET and not address.address.startswith("127.")]
    return found[0] if found else None


pytestmark = [pytest.mark.faults,
              pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0,
                                 reason="two simulated nodes need unshare as root"),
              pytest.mark.skipif(machine_address() is None, reason="no address but loopback for the nodes' master")]


def start_node(node: int, tmp: Path, start: int, port: int, fault: dict[str, Any] | None) -> subprocess.Popen:
    """Node ``node``'s ``srun bash recipes/slurm/node.sh`` in the job's ``start``-th start (its output in a log of
    its own: a requeued job appends to one log per start here)."""
    home = tmp / f"node{node}"
    env = offline_env(home, PYTHONPATH=str(HOOK), HERA_TEST_TEACHER_ROWS=ROWS, PYTHONUNBUFFERED="1",
                      HOME=str(home / "home"), XDG_CACHE_HOME=str(home / "cache"), NODE_SCRATCH=str(home / "scratch"),
                      RECIPE=str(tmp / "recipe.yaml"), OUTPUT_DIR=str(tmp / "shared" / "out"),
                      MASTER_ADDR=machine_address(), MASTER_PORT=str(port),
                      GLOO_SOCKET_IFNAME="lo", SLURM_NNODES="2", SLURM_NODEID=str(node),
                      SLURM_JOB_ID="4242", SLURM_RESTART_COUNT=str(start), GPUS_PER_NODE="1",
                      EXTRA_KEYS=f"hera_save_on_signal=sigusr1 hera_watchdog_timeout={BOUND} "
                                 "resume_from_checkpoint=true",  # the job's every start: the same command
                      **fault_env(fault))
    env[LAUNCH_ENV] = f"node{node}-{start}-{os.getpid()}"
    (home / "home").mkdir(parents=True, exist_ok=True)
    log = (home / f"start{start}.log").open("w", encoding="utf-8")
    command = ["unshare", "--uts", "--pid", "--fork", "--mount-proc", "sh", "-c",
               f"hostname node{node} && exec bash {NODE_SH}"]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def end(processes: list[psutil.Process]) -> None:
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.kill()  # SIGKILL ends a stopped process too


def printed(tmp: Path, node: int, start: int) -> str:
    return (tmp / f"node{node}" / f"start{start}.log").read_text(encoding="utf-8")


def test_a_frozen_node_ends_the_job_and_the_same_command_requeued_finishes_it(assets: Any, tmp_path: Path) -> None:
    out = tmp_path / "shared" / "out"
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe(assets, out)), encoding="utf-8")
    port = free_port()
    nodes = [start_node(0, tmp_path, 0, port, None),
             start_node(1, tmp_path, 0, port, {"point": "sigstop", "rank": 1, "at": 2})]
    marks = [f"node{k}-0-{os.getpid()}" for k in range(2)]
    try:
        deadline = time.monotonic() + 400
        while "rank 1: SIGSTOP" not in printed(tmp_path, 1, 0):
            assert time.monotonic() < deadline and nodes[0].poll() is None and nodes[1].poll() is None, (
                printed(tmp_path, 0, 0)[-4000:], printed(tmp_path, 1, 0)[-4000:])
            time.sleep(1)
        frozen = processes_marked(LAUNCH_ENV, marks[1])
        for process in frozen:  # the whole node, its torchrun agent included: a hung host
            with contextlib.suppress(psutil.Error):
                process.suspend()
        stopped = float(re.search(r"rank 1: SIGSTOP at (\d+\.\d+)", printed(tmp_path, 1, 0))[1])
        code = nodes[0].wait(timeout=BOUND + 120)
        ended = time.time() - stopped
    finally:
        for mark in marks:
            end(processes_marked(LAUNCH_ENV, mark))
        for node in nodes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.wait(timeout=30)
    first = printed(tmp_path, 0, 0)
    assert "holds no run yet: starting it" in first, first[-5000:]  # resume_from_checkpoint: true on the first start
    found = re.findall(r"\[llamafactory-hera\] watchdog: rank 1 on node1, unheard for (\d+) s", first)
    assert code != 0 and len(found) == 1, first[-5000:]
    assert BOUND <= int(found[0]) <= BOUND + 2 * watchdog.PULSE and ended <= BOUND + 4 * watchdog.PULSE, (found, ended)
    print(f"two nodes: node 1 frozen in step 2; node 0 ended the job {ended:.0f} s after the freeze")

    # the requeue: the same command on both nodes
    nodes = [start_node(k, tmp_path, 1, port, None) for k in range(2)]
    try:
        codes = [node.wait(timeout=400) for node in nodes]
    finally:
        for k in range(2):
            end(processes_marked(LAUNCH_ENV, f"node{k}-1-{os.getpid()}"))
    again = printed(tmp_path, 0, 1)
    assert codes == [0, 0], (again[-5000:], printed(tmp_path, 1, 1)[-3000:])
    assert '"status": "finished"' in (out / "llamafactory_hera_run.json").read_text(encoding="utf-8")

    reference = tmp_path / "reference" / "out"
    proc = launch("ddp", tmp_path / "reference", [{"recipe": recipe(assets, reference), "env": {}}],
                  tmp_path / "reference" / "cache")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert not (bad := differences(model_tensors(reference), model_tensors(out))), bad[:5]
