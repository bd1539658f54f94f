"""The measured table's tooling: tests/cost_record.py's process count, tests/cost_table.py's COSTS.md from a small
fake recording, and ``python3 dev.py costs`` (recording, or ``--from DIR`` alone). No training run: one launch of a
bare pytest (no torch, no plugin imported) for the count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cost_table
import pytest
from test_readme import _dev

from conftest import REPO, offline_env

INNER_TESTS = '''
import multiprocessing
import os
import subprocess
import sys


def test_launches():
    subprocess.run([sys.executable, "-c", "pass"], check=True)  # one
    subprocess.run([sys.executable, "-c", "import subprocess, sys; subprocess.run([sys.executable, '-c', 'pass'])"],
                   check=True)  # one: its child is a grandchild, not counted
    process = multiprocessing.get_context("spawn").Process(target=print)  # one
    process.start()
    process.join()


def test_launches_nothing():
    pass


def test_closes_a_warm_process(tmp_path):  # a warm process importing nothing, its one launch burning 1 CPU s
    import warm_launch
    burn = "import time\\nend = time.process_time() + 1\\nwhile time.process_time() < end:\\n    pass\\n"
    (tmp_path / "burn.py").write_text(burn)
    server = warm_launch.WarmServer(dict(os.environ), ())
    warm_launch.CPU_SECONDS.append(server.launch(str(tmp_path / "burn.py"), [], tmp_path, [dict(os.environ)], None,
                                                 60)[1])
    server.close()


def test_launches_warm():  # as tests/warm_launch.py records a warm process's start and a launch it forked
    warm = sys.modules["warm_launch"]
    warm.START_CPU_SECONDS.append(5.0)
    warm.CPU_SECONDS.append(7.0)
'''


def test_the_record_counts_the_processes_a_test_starts(tmp_path: Path) -> None:
    """Two Popen (one of them starting a grandchild, not counted) and a multiprocessing process: 3; none: 0; the CPU
    seconds of warm launches (tests/warm_launch.py), which no process of the test's own reports, in its children's
    and said apart; a warm process closed in the test (reaped: the worker's children's CPU time grows by its start
    and its launches) counted once, with its start. A launch:
    the counting wraps the process-starting methods when the module is imported with HERA_TEST_COSTS set, which this
    session's import did not see; a bare pytest with plugins not auto-loaded costs about 1 CPU s."""
    (tmp_path / "test_inner.py").write_text(INNER_TESTS, encoding="utf-8")
    folder = tmp_path / "costs"
    folder.mkdir()
    env = {**os.environ, "HERA_TEST_COSTS": str(folder), "PYTHONPATH": str(REPO / "tests"),
           "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    env.pop("PYTEST_XDIST_WORKER", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "cost_record", "-p", "no:cacheprovider",
                           "test_inner.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = {record["test"]: record for record in cost_table.read(folder)}
    assert records["test_inner.py::test_launches"]["processes"] == 3, records
    assert records["test_inner.py::test_launches_nothing"]["processes"] == 0, records
    assert records["test_inner.py::test_launches"]["children_cpu"] > 0, records
    warm = records["test_inner.py::test_launches_warm"]
    assert warm["warm_cpu"] == 12.0 and 12.0 <= warm["children_cpu"] < 13.0 and warm["warm_starts"] == 1, records
    closed = records["test_inner.py::test_closes_a_warm_process"]
    assert closed["warm_starts"] == 1 and closed["processes"] == 1 and closed["warm_cpu"] >= 1.0, records
    assert closed["warm_cpu"] - 0.2 < closed["children_cpu"] < closed["warm_cpu"] + 0.3, records
    assert records["test_inner.py::test_launches_nothing"]["warm_cpu"] == 0.0, records


def _recording(folder: Path) -> None:
    """Two workers' files: a cheap and a dear test in one module, a test recorded twice, one record without
    ``processes`` (made before they were counted) and one without ``warm_starts``, a parametrize id holding ``|``."""
    rows = {"gw0": [{"test": "tests/a.py::cheap", "wall": 1.0, "cpu": 0.5, "children_cpu": 0.0, "processes": 0,
                     "warm_starts": 0},
                    {"test": "tests/a.py::dear", "wall": 60.0, "cpu": 2.0, "children_cpu": 40.0, "processes": 2,
                     "warm_starts": 1},
                    {"test": "tests/b.py::twice", "wall": 5.0, "cpu": 4.0, "children_cpu": 1.0, "processes": 1,
                     "warm_starts": 1}],
            "gw1": [{"test": "tests/b.py::twice", "wall": 5.0, "cpu": 4.0, "children_cpu": 1.0, "processes": 1,
                     "warm_starts": 1},
                    {"test": "tests/c.py::old", "wall": 3.0, "cpu": 20.0, "children_cpu": 0.0},
                    {"test": "tests/a.py::ids[x|y]", "wall": 2.0, "cpu": 1.0, "children_cpu": 0.0, "processes": 0}]}
    folder.mkdir()
    for worker, records in rows.items():
        (folder / f"{worker}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in records), encoding="utf-8")


def test_the_table_sorts_by_cpu_and_sums_each_module(tmp_path: Path) -> None:
    """Modules and tests by CPU seconds (own + children), most first; a test recorded twice summed once; a missing
    count (processes, warm starts) a ``?`` in its test's, its module's and the total's row."""
    _recording(tmp_path / "rec")
    text = cost_table.write(tmp_path / "rec", tmp_path / "COSTS.md").read_text(encoding="utf-8")
    modules = text.split("## Modules")[1].split("## Tests")[0]
    tests = text.split("## Tests")[1]
    totals = ("5 tests in 3 modules: wall 76.0 s, CPU 73.5 s (31.5 own + 42.0 children); processes started: ?; "
              "warm processes started: ?.")
    assert totals in text, text
    module_rows = [line for line in modules.splitlines() if line.startswith("| tests/")]
    assert module_rows == ["| tests/a.py | 3 | 63.0 | 43.5 | 3.5 | 40.0 | 2 | ? |",
                           "| tests/c.py | 1 | 3.0 | 20.0 | 20.0 | 0.0 | ? | ? |",
                           "| tests/b.py | 1 | 10.0 | 10.0 | 8.0 | 2.0 | 2 | 2 |"], modules
    test_rows = [line for line in tests.splitlines() if line.startswith("| tests/")]
    assert test_rows == ["| tests/a.py::dear | 60.0 | 42.0 | 2.0 | 40.0 | 2 | 1 |",
                         "| tests/c.py::old | 3.0 | 20.0 | 20.0 | 0.0 | ? | ? |",
                         "| tests/b.py::twice (x2 runs) | 10.0 | 10.0 | 8.0 | 2.0 | 2 | 2 |",
                         "| tests/a.py::ids[x\\|y] | 2.0 | 1.0 | 1.0 | 0.0 | 0 | ? |",
                         "| tests/a.py::cheap | 1.0 | 0.5 | 0.5 | 0.0 | 0 | 0 |"], tests


def test_an_empty_recording_folder_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"no recording in .*: no \*\.jsonl file"):
        cost_table.read(tmp_path)


def test_dev_costs_records_a_run_or_writes_from_a_recording(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``costs``: the test command with HERA_TEST_COSTS naming a new folder, then the table from it (the run's exit
    code kept); ``costs --from DIR``: the table alone, nothing set up."""
    dev = _dev()
    monkeypatch.delenv("HERA_TEST_COSTS", raising=False)
    ran: list[list[str]] = []
    monkeypatch.setattr(dev, "run", lambda cmd, env=None, check=True: ran.append([str(c) for c in cmd]) or 0)
    monkeypatch.setattr(dev, "setup", lambda command: pytest.fail("--from sets nothing up"))
    assert dev.main(["costs", "--from", str(tmp_path)]) == 0
    assert ran == [[sys.executable, str(REPO / "tests" / "cost_table.py"), str(tmp_path),
                    str(REPO / "tests" / "COSTS.md")]]
    seen: list[tuple[str, list[str]]] = []
    monkeypatch.setattr(dev, "setup", lambda command: Path(sys.executable))
    monkeypatch.setattr(dev, "cmd_test", lambda python, args: seen.append((os.environ["HERA_TEST_COSTS"], args)) or 1)
    assert dev.main(["costs", "-k", "x"]) == 1
    ((folder, args),) = seen
    assert args == ["-k", "x"] and Path(folder).is_dir() and ran[-1][2] == folder
    os.rmdir(folder)


def test_a_pytest_a_test_starts_records_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment of the processes tests start leaves HERA_TEST_COSTS out: a pytest run inside a test (one with
    this conftest, tests/test_conftest_streams.py) would add its inner tests' lines to the recording."""
    monkeypatch.setenv("HERA_TEST_COSTS", str(tmp_path))
    assert "HERA_TEST_COSTS" not in offline_env(tmp_path)
