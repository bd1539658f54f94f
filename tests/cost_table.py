"""tests/COSTS.md from a recording of tests/cost_record.py (``HERA_TEST_COSTS=DIR``: one JSON line per test in
DIR/<worker>.jsonl): each test's wall seconds, CPU seconds (its own and its children's) and processes started, sorted
by CPU seconds, and each module's totals. Standard library only: ``python3 dev.py costs`` runs it outside the venv.

    python3 tests/cost_table.py DIR [OUT]    write OUT (tests/COSTS.md) from the recording in DIR

A test recorded more than once (a recording folder used for two runs) is shown once with its runs summed and
counted; a record without ``processes`` or ``warm_starts`` (a recording made before they were counted) shows ``?``
there."""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

OUT = Path(__file__).with_name("COSTS.md")
HEADER = """# What each test costs

Made by `python3 dev.py costs` (the pinned stack's suite as `python3 dev.py test` runs it, each test's cost recorded by
tests/cost_record.py), or from a recording made before by `python3 dev.py costs --from DIR` (DIR: the folder a run's
`HERA_TEST_COSTS` named). Wall: seconds from the test's setup to its teardown. CPU: its own process's seconds plus
those of the processes it started and waited for (their children's included). Processes: how many processes the
test's own process started (their children, such as torchrun's ranks, not counted; see tests/cost_record.py). Warm:
how many warm processes (tests/warm_launch.py, about 15 CPU s each) it started. Sorted by CPU seconds, most first.
"""


@dataclass
class Cost:
    """One test's or one module's summed records."""

    name: str
    runs: int = 0
    wall: float = 0.0
    cpu: float = 0.0
    children_cpu: float = 0.0
    processes: int | None = 0  # None: a record without the count
    warm_starts: int | None = 0  # the same

    @property
    def total_cpu(self) -> float:
        return self.cpu + self.children_cpu

    def add(self, record: dict) -> None:
        self.runs += 1
        self.wall += record["wall"]
        self.cpu += record["cpu"]
        self.children_cpu += record["children_cpu"]
        self.processes = _plus(self.processes, record.get("processes"))
        self.warm_starts = _plus(self.warm_starts, record.get("warm_starts"))


def _plus(count: int | None, more: int | None) -> int | None:
    """``count + more``; None (unknown) where either is."""
    return None if count is None or more is None else count + more


def read(folder: Path) -> list[dict]:
    """Every record of the recording in ``folder`` (its ``*.jsonl`` files, one per pytest process)."""
    files = sorted(Path(folder).glob("*.jsonl"))
    if not files:
        raise SystemExit(f"no recording in {folder}: no *.jsonl file (a run with HERA_TEST_COSTS={folder} writes them)")
    return [json.loads(line) for path in files for line in path.read_text(encoding="utf-8").splitlines() if line]


def _sum(records: list[dict], key: Callable[[str], str]) -> list[Cost]:
    """``records`` summed by ``key`` of their test id, most CPU seconds first."""
    costs: dict[str, Cost] = {}
    for record in records:
        name = key(record["test"])
        costs.setdefault(name, Cost(name)).add(record)
    return sorted(costs.values(), key=lambda cost: (-cost.total_cpu, cost.name))


def _row(*cells: object) -> str:
    """One Markdown table row (a ``|`` in a test id escaped)."""
    return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"


def _numbers(cost: Cost) -> tuple[str, ...]:
    """Wall, CPU (own + children), own, children, processes, warm starts (``?``: a record without the count)."""
    return (f"{cost.wall:.1f}", f"{cost.total_cpu:.1f}", f"{cost.cpu:.1f}", f"{cost.children_cpu:.1f}",
            *("?" if count is None else str(count) for count in (cost.processes, cost.warm_starts)))


def table(records: list[dict]) -> str:
    """The Markdown of COSTS.md for ``records``: totals, the modules, then the tests."""
    tests = _sum(records, lambda test: test)
    modules = _sum(records, lambda test: test.partition("::")[0])
    whole = Cost("all")
    for record in records:
        whole.add(record)
    counts: dict[str, int] = defaultdict(int)  # module -> its tests
    for cost in tests:
        counts[cost.name.partition("::")[0]] += 1
    wall, cpu, own, children, processes, warm = _numbers(whole)
    lines = [HEADER, f"{len(tests)} tests in {len(modules)} modules: wall {wall} s, CPU {cpu} s ({own} own + "
             f"{children} children); processes started: {processes}; warm processes started: {warm}.", "",
             "## Modules", "", _row("module", "tests", "wall s", "CPU s", "own", "children", "processes", "warm"),
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [_row(cost.name, counts[cost.name], *_numbers(cost)) for cost in modules]
    lines += ["", "## Tests", "", _row("test", "wall s", "CPU s", "own", "children", "processes", "warm"),
              "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [_row(cost.name + (f" (x{cost.runs} runs)" if cost.runs > 1 else ""), *_numbers(cost)) for cost in tests]
    return "\n".join(lines) + "\n"


def write(folder: Path, out: Path = OUT) -> Path:
    """Write ``out`` from the recording in ``folder``; returns ``out``."""
    Path(out).write_text(table(read(folder)), encoding="utf-8")
    return Path(out)


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        raise SystemExit(__doc__)
    print(f"wrote {write(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) == 3 else OUT)}")
