"""The watchdog's campaign: healthy runs that are slow beside runs that hang, each a real job of two gloo ranks on this
CPU (one node, or two simulated nodes), running the plugin's real watchdog and sections as a plugin run enters them
(tests/watch_campaign_case.py), every case at once (tests/watch_campaign_launch.py: forked from one process that
imported torch and the watchdog once). docs/multinode.md ("The campaign") holds the table.

One time factor scales every case: the bound (``hera_watchdog_timeout``) is :data:`BOUND` seconds and every duration
is a multiple of it. A healthy case must not end: both ranks exit 0 and no node's log holds a watchdog line. A hang
must end: the culprit rank, alone, named in every node's log (a frozen node's own: its thawed line), within the bound
and :data:`SLACK` (the monitor judges once a pulse; a loaded 2-core machine delays it), every rank's exit non-zero.
Gates are on who was named and the exit codes; the seconds only against that generous limit.

A case whose feature is not in the watchdog yet is marked ``xfail`` (not strict) with the feature it waits for.
``HERA_WATCH_CAMPAIGN_DOC=1`` writes this run's table into docs/multinode.md instead of comparing with it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from filelock import FileLock

from conftest import RUN_ENV, offline_env, run_process

HERE = Path(__file__).resolve().parent
DOC = HERE.parent / "docs" / "multinode.md"
MARKERS = ("<!-- campaign table -->", "<!-- campaign table end -->")
BOUND = 3.0  # seconds: hera_watchdog_timeout of every case (pulse: a quarter)
SLACK = 3 * BOUND  # a hang's line within BOUND + SLACK of its fault
ENDING = re.compile(r"watchdog: (.*?)\. Every rank exits")
COLLECTIVE = re.compile(r"watchdog: rank \d+ on \S+: a collective in .* failed")
THAWED = re.compile(r"watchdog: rank (\d+) on (\S+) was stopped")
TWO_NODES = os.geteuid() == 0 and shutil.which("unshare") is not None  # a UTS namespace per node needs root

GROWTH = "a save's growing files as progress"
BACKSTOP = "no process-group timeout before the watchdog's line"
CULPRIT = "forward/backward/optimizer/collective progress points: the first-stopped rank named alone"


@dataclass(frozen=True)
class Case:
    """One case: its plan for tests/watch_campaign_case.py (durations in bounds), the rank to name (None: healthy),
    its nodes, and the feature it waits for (None: passes today)."""

    name: str
    plan: dict[str, Any]
    culprit: int | None = None
    nodes: int = 1
    pending: str | None = None

    @property
    def work(self) -> float:
        """Its planned work in seconds."""
        plan = self.plan
        return BOUND * (sum(plan.get("saves", [])) + sum(float(plan.get(key, 0)) for key in (
            "stall", "predict", "download", "recompile", "rotate")))


CASES = [
    Case("slow later save", {"saves": [1, 4.5]}),
    Case("slow later save, two nodes", {"saves": [1, 4.5]}, nodes=2),
    Case("storage stall in a save", {"saves": [0.2, 0.5], "stall": 8, "stall_step": 2}),
    Case("long predict", {"predict": 5}),
    Case("long download in selection", {"download": 5}),
    Case("recompile", {"recompile": 2}),
    Case("rotation of a large checkpoint", {"saves": [0.2, 0.2], "rotate": 3}),
    Case("frozen rank", {"saves": [0.2], "fault": {"point": "sigstop", "step": 2}}, culprit=1),
    Case("frozen node, two nodes", {"saves": [0.2], "fault": {"point": "sigstop", "step": 2}, "freeze_node": True},
         culprit=1, nodes=2),
    Case("stuck before the forward", {"fault": {"point": "forward", "step": 2}}, culprit=1),
    Case("stuck before the backward", {"fault": {"point": "backward", "step": 2}}, culprit=1),
    Case("stuck in the optimizer step", {"fault": {"point": "optimizer", "step": 2}}, culprit=1),
    Case("stuck in the optimizer step, two nodes", {"fault": {"point": "optimizer", "step": 2}}, culprit=1, nodes=2),
    Case("stuck before a plugin collective", {"saves": [0.2], "fault": {"point": "collective", "step": 1}}, culprit=1),
    Case("stuck in the last barrier", {"fault": {"point": "barrier"}}, culprit=1),
    Case("polling in loading", {"fault": {"point": "poll", "rank": 0}}, culprit=0),
]
LAUNCHED = [case for case in CASES if case.nodes == 1 or TWO_NODES]


def _planned(case: Case) -> dict[str, Any]:
    """The case as tests/watch_campaign_case.py reads it."""
    plan = dict(case.plan)
    if "fault" in plan:
        plan["fault"] = {"rank": case.culprit, **plan["fault"]}
    return {"name": case.name, "bound": BOUND, "nodes": case.nodes, "deadline": 30 + 1.5 * case.work, **plan}


@pytest.fixture(scope="module")
def campaign(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The campaign's results (tests/watch_campaign_launch.py), run once per pytest run: the first worker to get
    here runs it, the others read its results."""
    shared = tmp_path_factory.getbasetemp()  # pytest-N, which pytest removes runs later; a worker's is in it
    shared = shared.parent if os.environ.get("PYTEST_XDIST_WORKER") else shared
    folder = shared / f"watch-campaign-{os.environ.get(RUN_ENV, os.getpid())}"
    folder.mkdir(exist_ok=True)
    with FileLock(folder / "lock"):
        results = folder / "results.json"
        if not results.is_file():
            (folder / "cases.json").write_text(json.dumps([_planned(case) for case in LAUNCHED]), encoding="utf-8")
            proc = run_process([sys.executable, str(HERE / "watch_campaign_launch.py"), str(folder / "cases.json"),
                                str(folder)], cwd=folder, env=offline_env(folder, PYTHONUNBUFFERED="1"),
                               timeout=300)
            assert proc.returncode == 0 and results.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    found = json.loads(results.read_text(encoding="utf-8"))
    rows = [row(case, found[case.name]) for case in LAUNCHED]
    return {"folder": folder, "rows": rows, "cpu_s": found["cpu_s"]}


def named(line: str) -> list[str]:
    """The ranks a watchdog line names, one entry a clause: ``rank 1``, ``ranks 0, 1``, with ``on nodeK`` where the
    host is a simulated node's."""
    found = []
    for clause in line.split("; "):
        if match := re.match(r"(ranks? \d+(?:(?:, |-)\d+)*)(?: on (\S+?))?[,:]", clause):
            host = match[2] or ""
            found.append(match[1] + (f" on {host}" if re.fullmatch(r"node\d+", host) else ""))
    return found


def endings(lines: list[str]) -> list[list[str]]:
    """What each line that ended the job names (a thawed rank's line is not one)."""
    return [named(ending) for line in lines if not THAWED.search(line) for ending in ENDING.findall(line)]


def row(case: Case, result: dict[str, Any]) -> dict[str, Any]:
    """What the case's run showed: the named ranks, seconds to the line, every rank's exit code, each node's lines."""
    nodes = result["nodes"]
    said = sorted({", ".join(ending) for node in nodes for ending in endings(node.get("lines", []))})
    failed = [line for node in nodes for line in node.get("lines", []) if COLLECTIVE.search(line)]
    faults = [node["fault_at"] for node in nodes if node.get("fault_at")]
    times = [node["line_at"] for node in nodes if node.get("line_at")]
    since = faults[0] if faults else result["started"]
    codes = {int(rank): code for node in nodes for rank, code in node.get("codes", {}).items()}
    who = " / ".join(said) if said else "nobody"
    if not said and failed:  # ended all the same: by a collective's failure (a timeout, a peer gone)
        who += ": a collective failed"
    return {
        "case": case.name, "nodes": case.nodes, "bound": BOUND, "killed": result["killed"],
        "seconds": round(min(times) - since, 1) if times else None,
        "named": who,
        "codes": [codes.get(rank) for rank in range(2)],
        "lines": [node.get("lines", []) for node in nodes],
    }


def failures(case: Case, found: dict[str, Any]) -> list[str]:
    """What the case's run did that it must not (empty: as it should)."""
    lines = found["lines"]
    if found["killed"]:
        return [f"still running at its deadline (killed by the campaign); lines {lines}"]
    if case.culprit is None:
        wrong = [] if found["codes"] == [0, 0] else [f"exit codes {found['codes']}"]
        return wrong + [f"a watchdog line: {line}" for node in lines for line in node]
    wrong = [] if all(code not in (0, None) for code in found["codes"]) else [f"exit codes {found['codes']}"]
    for node, node_lines in enumerate(lines):
        thawed = [match for line in node_lines if (match := THAWED.search(line))]
        if thawed and int(thawed[0][1]) == case.culprit:
            continue  # the frozen node's own log: its thawed line
        ended = endings(node_lines)
        if not ended or any(entries != [_rank(case)] for entries in ended):
            wrong.append(f"node {node}: named {ended or 'nobody'}, not {_rank(case)} alone: {node_lines}")
    if found["seconds"] is None or found["seconds"] > BOUND + SLACK:
        wrong.append(f"the line {found['seconds']} s after the fault (bound {BOUND:.0f} s + {SLACK:.0f} s)")
    return wrong


def _rank(case: Case) -> str:
    return f"rank {case.culprit}" + (f" on node{case.culprit}" if case.nodes > 1 else "")


def _marked(case: Case) -> Any:
    marks = [pytest.mark.xfail(strict=False, reason=f"waits for: {case.pending}")] if case.pending else []
    if case not in LAUNCHED:
        marks.append(pytest.mark.skip(reason="two simulated nodes need unshare as root"))
    return pytest.param(case, marks=marks, id=case.name.replace(" ", "-").replace(",", ""))


@pytest.mark.parametrize("case", [_marked(case) for case in CASES])
def test_a_case_ends_as_it_should(campaign: dict[str, Any], case: Case) -> None:
    """A healthy case is never ended; a hang is ended within the bound with its culprit named alone in every node's
    log."""
    found = next(found for found in campaign["rows"] if found["case"] == case.name)
    log = campaign["folder"] / case.name / "node0.log"
    assert not failures(case, found), (failures(case, found), log.read_text(encoding="utf-8")[-3000:])


def markdown(rows: list[dict[str, Any]]) -> str:
    """The campaign's table as docs/multinode.md holds it."""
    lines = ["| case | nodes | bound | seconds to the line | named | ranks' exit |", "|---|---|---|---|---|---|"]
    for found in rows:
        seconds = "-" if found["seconds"] is None else f"{found['seconds']:.1f}"
        codes = "killed at its deadline" if found["killed"] else ", ".join(str(code) for code in found["codes"])
        lines.append(f"| {found['case']} | {found['nodes']} | {found['bound']:.0f} s | {seconds} | {found['named']} | "
                     f"{codes} |")
    return "\n".join(lines)


def doc_rows(text: str) -> list[tuple[str, str]]:
    """(case, named) of each row of the doc's campaign table."""
    table = text.split(MARKERS[0], 1)[1].split(MARKERS[1], 1)[0]
    cells = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in table.strip().splitlines()]
    return [(found[0], found[4]) for found in cells[2:]]


def test_the_table_printed_and_in_the_docs(campaign: dict[str, Any]) -> None:
    """The table from this run's output, printed; docs/multinode.md holds one of the same cases in the same order and,
    for every case not waiting for a feature, the same ranks named (not the seconds, which vary). With
    ``HERA_WATCH_CAMPAIGN_DOC=1`` this run's table is written there instead."""
    table = markdown(campaign["rows"])
    print(f"{table}\n{len(campaign['rows'])} cases, {campaign['cpu_s']} CPU s in all")
    text = DOC.read_text(encoding="utf-8")
    if os.environ.get("HERA_WATCH_CAMPAIGN_DOC") == "1":
        before, rest = text.split(MARKERS[0], 1)
        DOC.write_text(f"{before}{MARKERS[0]}\n{table}\n{MARKERS[1]}{rest.split(MARKERS[1], 1)[1]}", encoding="utf-8")
        return
    documented = doc_rows(text)
    assert [name for name, _ in documented] == [case.name for case in CASES], documented
    settled = {case.name for case in LAUNCHED if not case.pending}
    ran = {found["case"]: found["named"] for found in campaign["rows"]}
    assert [(name, who) for name, who in documented if name in settled] == [
        (name, ran[name]) for name, _ in documented if name in settled], (documented, ran)


def test_the_named_ranks_of_a_line() -> None:
    """What the table says was named, read from the watchdog's lines as they are now."""
    stuck = ("ranks 0, 1 on vm, no progress for 3 s in step 2 (bound 3 s): alive but stuck; every rank stopped at "
             "the same point")
    assert named(stuck) == ["ranks 0, 1"]
    assert named("rank 1 on node1, unheard for 3 s in step 1 (bound 3 s): frozen") == ["rank 1 on node1"]
    assert named("rank 0 on vm, unheard for 4 s in step 2 (bound 3 s): gone; the job's store at h:1 does not answer "
                 "either (rank 1 is in step 2)") == ["rank 0"]
    assert named("ranks 2, 3, never heard in this launch (9 s, bound 9 s)") == ["ranks 2, 3"]
