"""Test files run together in one process (``-p no:xdist``) log cleanly: a library's logging handler made while a
test's ``capfd`` captured is pointed at the session's streams when the test ends (conftest.py
``_release_test_streams``), not left on the fixture's closed file ("--- Logging error ---" in every later record).
And a launch's output pipes never keep a test waiting: conftest.py ``run_process`` ends every process a launch
started when it times out or when its launcher exited and left one running (torchrun's ranks run in sessions of their
own)."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import offline_env, run_process

INNER_TESTS = '''
import logging
import sys


def test_a_library_configures_its_logging_while_capfd_captures(capfd):
    # as LLaMA-Factory's first import (extras/logging.py): StreamHandler(sys.stdout)
    logging.getLogger("like_llamafactory").addHandler(logging.StreamHandler(sys.stdout))
    # as transformers' (utils/logging.py): StreamHandler() on sys.stderr, its flush bound to that stream's
    handler = logging.StreamHandler()
    handler.flush = sys.stderr.flush
    logging.getLogger("like_transformers").addHandler(handler)


def test_a_later_test_logs_through_those_handlers(capsys):
    logging.getLogger("like_llamafactory").warning("to stdout")
    logging.getLogger("like_transformers").warning("to stderr")
    assert "Logging error" not in capsys.readouterr().err
'''


@pytest.mark.parametrize("capture", ["fd", "no"])
def test_handlers_made_under_capfd_outlive_the_test(tmp_path: Path, capture: str) -> None:
    """Under pytest's own capture (the session's streams are its files) and without (the terminal's)."""
    # the conftest and the modules it imports
    for support in ("conftest.py", "cost_record.py", "slow_first.py", "frozen_heap.py", "warm_launch.py"):
        (tmp_path / support).write_text(Path(__file__).with_name(support).read_text(encoding="utf-8"), encoding="utf-8")
    (tmp_path / "test_inner.py").write_text(INNER_TESTS, encoding="utf-8")
    proc = run_process([sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider",
                        f"--capture={capture}", "test_inner.py"], cwd=tmp_path, env=offline_env(tmp_path), timeout=120)
    assert proc.returncode == 0 and "2 passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Logging error" not in proc.stdout + proc.stderr, proc.stdout[-3000:] + proc.stderr[-3000:]
    if capture == "no":  # the records reached the terminal's streams
        assert "to stdout" in proc.stdout and "to stderr" in proc.stderr, proc.stdout + proc.stderr


def _stand_in_launch(tmp_path: Path, waits: bool, timeout: float, failure: str) -> int:
    """A stand-in launcher through ``run_process``: it starts a child in a session of its own (as torchrun starts a
    rank) that holds the output pipes, then waits for it or exits. The launch fails with ``failure`` within 30 s;
    returns the child's pid."""
    launcher = ("import subprocess, sys, time\n"
                "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], "
                "start_new_session=True)\n"
                "print(f'pid of the rank: {child.pid}.', flush=True)\n" + ("time.sleep(300)\n" if waits else ""))
    started = time.monotonic()
    with pytest.raises(AssertionError, match=failure) as failed:
        run_process([sys.executable, "-c", launcher], cwd=tmp_path, env=offline_env(tmp_path), timeout=timeout)
    assert time.monotonic() - started < 30
    return int(re.search(r"pid of the rank: (\d+)\.", str(failed.value)).group(1))


def test_a_timed_out_launch_ends_every_process_it_started_even_in_a_session_of_its_own(tmp_path: Path) -> None:
    """On timeout the launch fails at once with its output so far, and the child is gone (killing the launcher's
    process group alone left the test waiting on the child's pipes)."""
    # any timeout the stand-in launcher outlives shows it: 5 s leaves it the time to start its child and print its pid
    # on a loaded machine
    assert _gone(_stand_in_launch(tmp_path, True, 5, r"timed out after 5 s; everything it started was killed"))


def test_a_process_left_running_by_its_exited_launcher_fails_the_launch(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A launcher that exits while a process it started still runs (an orphaned rank) fails the launch once the
    grace is over, long before its timeout, and the process is gone."""
    import conftest

    monkeypatch.setattr(conftest, "ORPHAN_GRACE_S", 1)
    assert _gone(_stand_in_launch(tmp_path, False, 120, r"exited \(code 0\) but what it started still ran 1 s later"))


def _gone(pid: int) -> bool:
    """``pid`` has ended (no such process, or a zombie its new parent has not reaped yet)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
