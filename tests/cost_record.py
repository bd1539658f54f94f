"""Each test's cost, for finding what makes the suite slow: with ``HERA_TEST_COSTS=DIR`` every pytest process (xdist
worker or not) appends one JSON line per test to DIR/<worker>.jsonl: the test's wall seconds (setup, call and
teardown), its own CPU seconds, the CPU seconds of the processes it started and waited for (torchrun's ranks
included: a launcher adds its children's when it reaps them), and ``processes``: how many processes the test's own
process started. CPU seconds stay meaningful on a loaded machine, where wall seconds do not. Off (no cost, nothing
wrapped) without the variable. ``python3 dev.py costs`` turns a recording into tests/COSTS.md (tests/cost_table.py).

What ``processes`` counts: every ``subprocess.Popen`` the pytest process makes (``subprocess.run``, ``call``,
``check_output`` included), from any of its threads, and every ``multiprocessing`` process it starts (a ``Process``,
a ``Pool``'s workers, a DataLoader's workers of an in-process run). What it does not: the processes those processes
start (a ``llamafactory-cli``'s torchrun, torchrun's or ``accelerate launch``'s ranks, a rank's DataLoader workers:
grandchildren, whose CPU seconds are in ``children_cpu`` all the same), bare ``os.fork`` / ``os.system`` /
``os.posix_spawn`` calls, and the ``multiprocess`` package's (``datasets.map(num_proc=...)``).
A warm launch's processes (tests/warm_launch.py) are forked by the worker's warm process, not started by the test:
their CPU seconds, and those of the warm process's start where the test started it, are added to ``children_cpu``
(``warm_cpu`` says how much of it they are; ``warm_starts``: how many warm processes the test started). A warm
process the test closes (a worker's least recently used one ended to start another, or all of them) adds its whole
CPU time to the worker's reaped children's, counted already at its start and its launches: that part is taken out."""

from __future__ import annotations

import json
import multiprocessing.process
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

FOLDER = os.environ.get("HERA_TEST_COSTS")
_started = [0]  # processes started by this pytest process so far


def _counting(start: Callable[..., Any]) -> Callable[..., Any]:
    """``start`` (a process-starting method), counting each call in :data:`_started`."""
    def counted(*args: Any, **kwargs: Any) -> Any:
        _started[0] += 1
        return start(*args, **kwargs)
    return counted


if FOLDER:  # Popen's every start goes through _execute_child; every multiprocessing start through BaseProcess.start
    subprocess.Popen._execute_child = _counting(subprocess.Popen._execute_child)
    multiprocessing.process.BaseProcess.start = _counting(multiprocessing.process.BaseProcess.start)


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _warm() -> tuple[float, float, int]:
    """This worker's warm processes so far (tests/warm_launch.py, imported here only where a test imported it): the
    CPU seconds of their launches and starts, those their closing added to the reaped children's again, their
    starts."""
    module = sys.modules.get("warm_launch")
    if not module:
        return 0.0, 0.0, 0
    return (sum(module.CPU_SECONDS) + sum(module.START_CPU_SECONDS), sum(module.CLOSED_CPU_SECONDS),
            len(module.START_CPU_SECONDS))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    if not FOLDER:
        yield
        return
    wall, own, children = time.time(), _cpu(resource.RUSAGE_SELF), _cpu(resource.RUSAGE_CHILDREN)
    started, warm_before = _started[0], _warm()
    yield
    warm, closed, warm_starts = (after - before for after, before in zip(_warm(), warm_before, strict=True))
    record = {"test": item.nodeid, "wall": round(time.time() - wall, 2),
              "cpu": round(_cpu(resource.RUSAGE_SELF) - own, 2),
              "children_cpu": round(_cpu(resource.RUSAGE_CHILDREN) - children + warm - closed, 2),
              "warm_cpu": round(warm, 2), "processes": _started[0] - started, "warm_starts": warm_starts}
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    Path(FOLDER).mkdir(parents=True, exist_ok=True)  # a folder not made yet (each worker may come first)
    with (Path(FOLDER) / f"{worker}.jsonl").open("a", encoding="utf-8") as out:
        out.write(json.dumps(record) + "\n")
