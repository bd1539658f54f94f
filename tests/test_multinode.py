"""Two nodes of a SLURM job on one machine, started as recipes/slurm/job.sh starts them (docs/multinode.md):
``recipes/slurm/node.sh`` once per node, each in its own UTS and PID namespace (its own host name) with its own
HOME, caches and TMPDIR, ``output_dir`` shared, one CPU rank per node. The namespace's first process (``sh``) outlives
node.sh's launcher as slurmstepd outlives a step's task, and its end ends every process left in the namespace, as
SLURM ends a step whose task ended. Every start of the job is the SAME command on both nodes
(``resume_from_checkpoint: true`` and the job's save signal: ``hera_save_on_signal: sigusr1`` as the sbatch passes it
for its ``--signal=USR1@N``, or the default SIGTERM); nothing is edited between starts. A start's fault
(tests/faults.py :func:`section_fault`, acted by tests/fault_injection/) is a signal in a section of one rank's run
(load, head selection, the teacher's pass, HARC's directions, a step, a save, the final save):

- ``sigkill``: every process of that rank's node killed (a lost host);
- ``sigterm`` / ``sigusr1``: sent by this test to every task of both nodes, as SLURM signals a job's tasks
  (preemption; the sbatch's ``--signal=USR1@N``): the save signal's stop, or with ``sigusr1`` chosen a SIGTERM that
  ends the ranks unsaved;
- ``sigstop``: every process of that rank's node stopped (a hung host): the other node must end the job with the
  watchdog's line naming the silent rank and node, within the bound.

In the suite (``HERA_MULTINODE_SEED`` repeats a printed seed): the seeded chain of a job on the default save signal
(a frozen node; a SIGTERM to every task, saved; the finish, with the adapter of the run never stopped, its reference
the same run on two DDP ranks of one node, tests/dist_runs.py), and the 72B job's FSDP2 launch stopped by its
SIGUSR1.

The campaign (not in the suite; one command)::

    HERA_MULTINODE_CAMPAIGN=N python3 dev.py test tests/test_multinode.py -m faults -p no:xdist

runs chains of seeded random (signal, section, node) starts, each followed by the same command, until N faulted starts
reached their fault, HeRA runs (the teacher's pass before step 1), HeRA runs with ``hera_heads: auto`` (head selection
before step 1) and HARC runs (its directions before step 1) in turn (``HERA_MULTINODE_STAGES=hera,harc``: some of
them), and prints the table: tries,
chains ended equal, lost, hand edits (a start of the same command that failed without a fault: an edit would have
been needed), per stage, section and signal, and the watchdog's time to end the job per section of a frozen node.

A launch of its own: two torchrun agents rendezvousing across namespaces, a frozen node and the requeue are what no
in-process test has."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from dist_runs import launch_runs
from faults import HOOK, ROWS, STEPS, fault_env, recipe, section_fault
from fsdp_checks import FSDP_HOOK, assert_fsdp2, fsdp2_config_file

from conftest import LAUNCH_ENV, free_port, offline_env, processes_marked
from llamafactory_hera.training import watch_bounds
from llamafactory_hera_testing.recipes import harc_recipe
from llamafactory_hera_testing.resume import differences, model_tensors

ROOT = Path(__file__).resolve().parents[1]
NODE_SH = ROOT / "recipes" / "slurm" / "node.sh"
BOUND = 20  # hera_watchdog_timeout of the test's job: seconds
SEED = int(os.environ.get("HERA_MULTINODE_SEED") or time.time_ns() % 100_000)
WATCHDOG_LINE = r"\[llamafactory-hera\] watchdog: rank (\d) on node(\d), unheard for (\d+) s"


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


@dataclass
class Start:
    """One start of the job: its fault, whether the fault was reached, the nodes' exit codes and logs, and for a
    frozen node the seconds from the freeze to the other node's exit."""

    fault: dict[str, Any] | None
    reached: bool
    codes: list[int | None]
    logs: list[str] = field(repr=False)
    finished: bool
    ended: float | None = None
    status: str | None = None  # the run record's, once both nodes ended


class Job:
    """A SLURM job of two nodes: ``make(out)``'s recipe of the stage whose keys start with ``prefix``, its output_dir
    and node folders under ``tmp``; :meth:`start` runs one start of it."""

    def __init__(self, tmp: Path, make: Any, prefix: str = "hera", keys: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.tmp, self.out, self.port, self.starts, self.prefix = tmp, tmp / "shared" / "out", free_port(), [], prefix
        # the job's every start: the same command (the sbatch's save signal, or ``keys``; ``env``: the sbatch's)
        self.keys = keys if keys is not None else f"{prefix}_save_on_signal=sigusr1"
        self.env = {"PYTHONPATH": str(HOOK), **(env or {})}
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "recipe.yaml").write_text(yaml.safe_dump(make(self.out)), encoding="utf-8")

    def _node(self, node: int, fault: dict[str, Any] | None) -> subprocess.Popen:
        """Node ``node``'s ``srun bash recipes/slurm/node.sh`` (its output in a log of its own per start)."""
        home, start = self.tmp / f"node{node}", len(self.starts)
        env = offline_env(home, HERA_TEST_TEACHER_ROWS=ROWS, PYTHONUNBUFFERED="1",
                          HOME=str(home / "home"), XDG_CACHE_HOME=str(home / "cache"),
                          NODE_SCRATCH=str(home / "scratch"), RECIPE=str(self.tmp / "recipe.yaml"),
                          OUTPUT_DIR=str(self.out), MASTER_ADDR=machine_address(), MASTER_PORT=str(self.port),
                          GLOO_SOCKET_IFNAME="lo", SLURM_NNODES="2", SLURM_NODEID=str(node), SLURM_JOB_ID="4242",
                          SLURM_RESTART_COUNT=str(start), GPUS_PER_NODE="1",
                          HERA_TEST_SIGNAL_FILE=str(self.tmp / f"signal{start}"),
                          EXTRA_KEYS=f"{self.keys} {self.prefix}_watchdog_timeout={BOUND} resume_from_checkpoint=true",
                          **self.env, **fault_env(fault))
        env[LAUNCH_ENV] = self.mark(node, start)
        (home / "home").mkdir(parents=True, exist_ok=True)
        log = (home / f"start{start}.log").open("w", encoding="utf-8")
        # sh stays the namespace's first process, as slurmstepd outlives the task it starts: when the task
        # (node.sh's llamafactory-cli) ends, sh ends and the kernel ends every process left in the namespace, as
        # SLURM ends a step's processes once its task has ended
        command = ["unshare", "--uts", "--pid", "--fork", "--mount-proc", "sh", "-c",
                   f"hostname node{node} && bash {NODE_SH}"]
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)

    def mark(self, node: int, start: int) -> str:
        return f"{self.tmp.name}-node{node}-{start}-{os.getpid()}"

    def printed(self, node: int, start: int) -> str:
        return (self.tmp / f"node{node}" / f"start{start}.log").read_text(encoding="utf-8")

    def start(self, fault: dict[str, Any] | None, on_freeze: Any = None, timeout: float = 600) -> Start:
        """One start, the same command on both nodes, ``fault`` given to both (its ``rank`` acts: node = rank). A
        signal to every task is sent here when the acting rank asks for it; a node whose rank stopped itself is
        stopped whole, and killed once the other node ended (``on_freeze()`` runs meanwhile)."""
        start, signal_file = len(self.starts), self.tmp / f"signal{len(self.starts)}"
        nodes = [self._node(k, fault) for k in range(2)]
        marks, frozen, ended = [self.mark(k, start) for k in range(2)], None, None
        deadline = time.monotonic() + timeout
        try:
            while any(node.poll() is None for k, node in enumerate(nodes) if k != frozen):
                assert time.monotonic() < deadline, [self.printed(k, start)[-3000:] for k in range(2)]
                if signal_file.exists():  # SLURM signals every task of the job
                    name = signal_file.read_text().upper()
                    for k, mark in enumerate(marks):
                        for process in processes_marked(LAUNCH_ENV, mark):
                            if process.pid != nodes[k].pid:  # unshare itself is no task of the node
                                with contextlib.suppress(psutil.Error):
                                    process.send_signal(getattr(signal, name))
                    signal_file.unlink()
                if frozen is None and fault and (found := re.search(
                        rf"rank {fault['rank']}: SIGSTOP .* at (\d+\.\d+)", self.printed(fault["rank"], start))):
                    frozen, stopped = fault["rank"], float(found[1])
                    for process in processes_marked(LAUNCH_ENV, marks[frozen]):  # the whole node: a hung host
                        with contextlib.suppress(psutil.Error):
                            process.suspend()
                    if on_freeze is not None:
                        on_freeze()
                time.sleep(0.2)
            if frozen is not None:
                ended = time.time() - stopped
                for process in processes_marked(LAUNCH_ENV, marks[frozen]):  # the hung host comes back
                    with contextlib.suppress(psutil.Error):
                        process.resume()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    nodes[frozen].wait(timeout=60)
        finally:
            for mark in marks:
                end(processes_marked(LAUNCH_ENV, mark))
            for node in nodes:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    node.wait(timeout=30)
        logs = [self.printed(k, start) for k in range(2)]
        record = self.out / "llamafactory_hera_run.json"
        finished = [node.returncode for node in nodes] == [0, 0] and record.is_file() and (
            '"status": "finished"' in record.read_text(encoding="utf-8"))
        status = json.loads(record.read_text(encoding="utf-8")).get("status") if record.is_file() else None
        self.starts.append(Start(fault, "[fault_injection]" in "".join(logs), [node.returncode for node in nodes],
                                 logs, finished, ended, status))
        return self.starts[-1]

    def chain(self, faults: list[dict[str, Any]], on_freeze: Any = None) -> list[Start]:
        """A start per fault, then starts without one until the run finished (at most two: a requeue that fails
        without a fault is a hand edit the job would need; this test never makes one)."""
        first = len(self.starts)
        for fault in [*faults, None, None]:
            if self.start(fault, on_freeze).finished or (fault is None and len(self.starts) - first > len(faults) + 1):
                break
        return self.starts[first:]


def end(processes: list[psutil.Process]) -> None:
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.kill()  # SIGKILL ends a stopped process too


def reference(tmp: Path, make: Any) -> Path:
    """The run of ``make(out)``'s recipe never stopped: two DDP ranks of one node (with the fault hook's teacher
    rows), forked from this worker's warm process (tests/dist_runs.py): the nodes' job is what is tested, this launch
    only the weights it must end with."""
    out = tmp / "out"
    launch_runs([{"recipe": make(out)}], tmp, 2, env={"PYTHONPATH": str(HOOK), "HERA_TEST_TEACHER_ROWS": ROWS})
    return out


def assert_watchdog_ended(started: Start, node: int) -> None:
    """The other node ended the job with the watchdog's one line naming rank ``node`` on its host, within the
    bound; the frozen node, thawed after that, says in its own log that it was stopped and the job ended meanwhile
    (no gloo traceback of its rank)."""
    survivor = started.logs[1 - node]
    found = re.findall(WATCHDOG_LINE, survivor)
    assert started.codes[1 - node] != 0 and len(found) == 1, survivor[-5000:]
    thawed = started.logs[node]
    assert re.search(rf"\[llamafactory-hera\] watchdog: rank {node} on node{node} was stopped \(its process or host "
                     r"frozen\) and went on \d+ s later; meanwhile the job ended", thawed), thawed[-5000:]
    assert not re.search(r"^(RuntimeError|torch\.distributed\.\w+Error): ", thawed, re.M), thawed[-5000:]
    assert found[0][:2] == (str(node), str(node)), found
    unheard = int(found[0][2])
    # the monitor judges once a pulse, and on a loaded machine (CI's 2 cores, 3 workers) its read comes a pulse late
    assert BOUND <= unheard <= BOUND + 3 * watch_bounds.PULSE and started.ended <= BOUND + 4 * watch_bounds.PULSE, (
        unheard, started.ended)


def test_a_seeded_chain_of_a_frozen_node_and_a_preemption_ends_as_never_stopped(assets: Any, tmp_path: Path) -> None:
    """A job on the default save signal (SIGTERM: a partition that preempts with a grace time, no ``--signal``).
    Start 1: a node frozen in a seeded section (the other ends the job, the watchdog's line). Start 2: SIGTERM to every
    task at a seeded step or save (SLURM's preemption): every rank saves and stops, both nodes exit 0, each node's log
    says so (its first rank's line and its launcher's), the record ``stopped`` (before: it ended ``llamafactory-cli``
    itself, 143, and the step's processes with it: no stop line, the record ``running``). Start 3 finishes equal to
    the reference, computed while the frozen node's partner waits out the bound (the machine's cores are idle then).
    (A SIGKILL of a node: the campaign.)"""
    rng = random.Random(SEED)
    frozen_section, node = rng.choice(["load", "precompute", "step", "save"]), rng.randrange(2)
    first = section_fault(rng, frozen_section, "sigstop", node)
    preempted = section_fault(rng, rng.choice(["step", "save"]), "sigterm", rng.randrange(2))
    print(f"HERA_MULTINODE_SEED={SEED}: {first} then {preempted}")
    # two steps more than faults.py's run, so that every seed's preemption stops before the last step: start 1 leaves
    # a whole checkpoint of step 2 at most (a node frozen before checkpoint-2's marker writes it once thawed), start
    # 2's SIGTERM then comes in step 4 or in checkpoint-4's save at the latest (the hook counts from the launch's
    # first step and save), and the ranks stop at the step after the one whose end noted it (STOP_MARGIN): step 6.
    # A stop agreed at the last step is the run's own end (it finishes, its record ``finished``): no preemption tested
    make = functools.partial(recipe, assets, max_steps=STEPS + 2)
    job, pool = Job(tmp_path, make, keys=""), ThreadPoolExecutor(1)
    pending: list[Any] = []
    try:
        starts = job.chain([first, preempted], lambda: pending.append(pool.submit(reference, tmp_path / "ref", make)))
        said = [(start.fault, start.reached, start.codes, start.status, start.finished) for start in starts]
        assert "holds no run yet: starting it" in starts[0].logs[0], starts[0].logs[0][-5000:]  # resume: true
        assert starts[0].reached and not starts[0].finished, said
        assert_watchdog_ended(starts[0], node)
        print(f"two nodes: node {node} frozen ({frozen_section}); the other ended the job {starts[0].ended:.0f} s "
              "after the freeze")
        # every node's log says why it ended: its first rank's stop line and its launcher's
        stops = [log.count("SIGTERM: saved the whole checkpoint") for log in starts[1].logs]
        launchers = [log.count("SIGTERM: the ranks saved and stopped (the run's record says stopped)")
                     for log in starts[1].logs]
        assert starts[1].reached and starts[1].codes == [0, 0] and starts[1].status == "stopped", (
            said, [log[-3000:] for log in starts[1].logs])
        assert stops == [1, 1] and launchers == [1, 1], (stops, launchers, [log[-3000:] for log in starts[1].logs])
        assert len(starts) == 3 and starts[2].finished, (SEED, said, [log[-3000:] for log in starts[-1].logs])
        out = pending[0].result() if pending else reference(tmp_path / "ref", make)
    finally:
        pool.shutdown(wait=True)
    assert not (bad := differences(model_tensors(out), model_tensors(job.out))), (SEED, said, bad[:5])


def test_the_fsdp2_launch_on_two_nodes_shards_and_stops_on_the_jobs_signal(assets: Any, tmp_path: Path) -> None:
    """recipes/slurm's FSDP2 launch (qwen2_5_72b_hera_fsdp2_2nodes.sbatch: node.sh with ACCELERATE_CONFIG, accelerate
    launch on each node) of a small HeRA LoRA run, its model sharded by FSDP2 over one rank per node (tests/fsdp_cpu/:
    FSDP2 on CPU ranks), each rank under FSDP2 at every step and save. The sbatch's SIGUSR1 to every task at a seeded
    step: every rank saves a whole checkpoint and stops, both nodes exit 0, the record ``stopped`` (its resume, the
    same code on one node: tests/test_fault_injection.py's FSDP2 chain). Before, node.sh launched DDP only: the 72B
    recipe had no multi-node launch."""
    rng = random.Random(SEED)
    stop = section_fault(rng, "step", "sigusr1", rng.randrange(2))
    print(f"HERA_MULTINODE_SEED={SEED}: {stop}")
    env = {"ACCELERATE_CONFIG": str(fsdp2_config_file(tmp_path)), "PYTHONPATH": f"{HOOK}{os.pathsep}{FSDP_HOOK}",
           "HERA_TEST_FSDP_ON_CPU": "1", "HERA_TEST_FSDP_EVIDENCE": str(tmp_path / "fsdp")}
    started = Job(tmp_path, functools.partial(recipe, assets), env=env).start(stop)
    stopped = [log.count("SIGUSR1: saved the whole checkpoint") for log in started.logs]  # each node's log says it
    assert started.reached and started.codes == [0, 0] and started.status == "stopped" and stopped == [1, 1], (
        started, [log[-3000:] for log in started.logs])
    assert_fsdp2(tmp_path, {"step", "save"})


STAGES = {  # a chain's run -> (its sections, its recipe for output_dir ``out``)
    "hera": (("load", "precompute", "step", "save", "final"), lambda assets, harc_assets, out: recipe(assets, out)),
    # head selection computes every teacher feature in its own pass: the teacher's pass before step 1 has none left
    "hera-auto": (("selection", "load", "step", "save", "final"),  # the selection loads its own model first
                  lambda assets, harc_assets, out: recipe(assets, out, hera_heads="auto", hera_select_samples=32,
                                                          hera_select_batch_size=8)),
    "harc": (("load", "directions", "step", "save", "final"),
             lambda assets, harc_assets, out: harc_recipe(harc_assets, "llama3", out, save_strategy="steps",
                                                          save_steps=1, save_total_limit=1,
                                                          overwrite_output_dir=False)),
}


@pytest.mark.skipif(not os.environ.get("HERA_MULTINODE_CAMPAIGN"),
                    reason="the campaign: HERA_MULTINODE_CAMPAIGN=N faulted starts")
def test_campaign_of_seeded_signals_at_every_phase_loses_no_run(assets: Any, harc_assets: Any,
                                                                 tmp_path: Path) -> None:
    """Chains of up to 3 seeded (signal, section, node) faults, each start the same command, until N faults were
    reached: HeRA (the teacher's pass before step 1), HeRA with ``hera_heads: auto`` (head selection before step 1)
    and HARC (its directions) chains in turn, or only the runs ``HERA_MULTINODE_STAGES`` lists
    (``hera,hera-auto,harc``). Each reached fault counts as equal (its chain finished bit for bit as the reference)
    or lost; a start that failed with no fault reached is a hand edit."""
    wanted, rng = int(os.environ["HERA_MULTINODE_CAMPAIGN"]), random.Random(SEED)
    stages = (os.environ.get("HERA_MULTINODE_STAGES") or ",".join(STAGES)).split(",")
    makes = {stage: functools.partial(STAGES[stage][1], assets, harc_assets) for stage in stages}
    expected = {stage: reference(tmp_path / f"reference-{stage}", make) for stage, make in makes.items()}
    rows: list[tuple[str, str, str, int, str]] = []
    edits: Counter = Counter()
    freezes: list[tuple[str, str, float | None, bool]] = []
    chain = 0
    while len(rows) < wanted:
        stage, sections = stages[chain % len(stages)], STAGES[stages[chain % len(stages)]][0]
        # in the order of a run's sections: a start's section is then seldom one its chain has passed for good (the
        # teacher's pass and the selection, once complete, are not run again)
        signals = ["sigkill", "sigterm", "sigusr1", "sigstop"]
        faults = sorted((section_fault(rng, rng.choice(sections), rng.choice(signals), rng.randrange(2))
                         for _ in range(min(3, wanted - len(rows)))),
                        key=lambda fault: sections.index(fault["section"]))
        job = Job(tmp_path / f"chain{chain}", makes[stage], stage.split("-")[0])
        starts = job.chain(faults)
        equal = starts[-1].finished and not differences(model_tensors(expected[stage]), model_tensors(job.out))
        for index, start in enumerate(starts):
            fault = start.fault or {}
            section, name = (fault["section"], fault.get("signal", "sigkill")) if fault else ("-", "-")
            if start.fault and start.reached:
                rows.append((stage, section, name, start.fault["rank"], "equal" if equal else "lost"))
                if name == "sigstop":
                    node = start.fault["rank"]
                    named = len(re.findall(rf"watchdog: rank {node} on node{node},", start.logs[1 - node])) == 1
                    freezes.append((stage, section, start.ended, named))
            elif not start.finished:  # the same command failed with no fault: an edit would be needed
                edits[(starts[index - 1].fault or {}).get("section", "-") if index else "-"] += 1
        print(f"chain {chain} ({stage}, ended equal: {equal}): "
              f"{[(start.fault, start.reached, start.codes, start.finished) for start in starts]}", flush=True)
        for index, start in enumerate(starts):  # what a failed start printed, for the reader of the table
            if not start.finished and not start.reached:
                print(f"chain {chain} start {index}:", *(log[-2500:] for log in start.logs), sep="\n", flush=True)
        chain += 1
    table = Counter(row[:3] for row in rows)
    print(f"HERA_MULTINODE_SEED={SEED}: faulted starts {len(rows)}, chains {chain}")
    print(f"{'run':<10}{'section':<11}{'signal':<9}{'tries':>6}{'equal':>6}{'lost':>6}")
    for (stage, section, name), tries in sorted(table.items()):
        equal = sum(row[:3] == (stage, section, name) and row[4] == "equal" for row in rows)
        print(f"{stage:<10}{section:<11}{name:<9}{tries:>6}{equal:>6}{tries - equal:>6}")
    print(f"hand edits needed: {sum(edits.values())} {dict(edits)}")
    print("frozen node -> job ended (stage, section, seconds, watchdog line naming it):", freezes)
    assert not [row for row in rows if row[4] == "lost"] and not edits and all(row[3] for row in freezes), (
        rows, edits, freezes)
