"""Each test's cost, for finding what makes the suite slow: with ``HERA_TEST_COSTS=DIR`` every pytest process (xdist
worker or not) appends one JSON line per test to DIR/<worker>.jsonl: the test's wall seconds (setup, call and
teardown), its own CPU seconds and the CPU seconds of the processes it started and waited for (torchrun's ranks
included: a launcher adds its children's when it reaps them). CPU seconds stay meaningful on a loaded machine,
where wall seconds do not. Off (no cost) without the variable."""

from __future__ import annotations

import json
import os
import resource
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

FOLDER = os.environ.get("HERA_TEST_COSTS")


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    if not FOLDER:
        yield
        return
    wall, own, children = time.time(), _cpu(resource.RUSAGE_SELF), _cpu(resource.RUSAGE_CHILDREN)
    yield
    record = {"test": item.nodeid, "wall": round(time.time() - wall, 2),
              "cpu": round(_cpu(resource.RUSAGE_SELF) - own, 2),
              "children_cpu": round(_cpu(resource.RUSAGE_CHILDREN) - children, 2)}
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with (Path(FOLDER) / f"{worker}.jsonl").open("a", encoding="utf-8") as out:
        out.write(json.dumps(record) + "\n")
