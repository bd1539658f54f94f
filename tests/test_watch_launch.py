"""A rank alive but stuck, in a real two-rank HeRA run (gloo, CPU): its main thread blocks for good as step 2 begins,
or as the model's load begins (tests/fault_injection/: ``hang``), while its threads run on; the other rank waits in a
collective (the step's, or one of the Trainer's set-up). The watchdog names the stuck rank, its host and the section
in one line, within the bound, and both ranks end. Without the watchdog, rank 0 waits for the recipe's
``ddp_timeout``. The ranks are forked from this worker's warm process (tests/warm_launch.py): a hang kills nothing,
so the launch needs no start-up environment of its own."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
from dist_runs import PROBE, warm_script
from faults import HOOK, ROWS, fault_env, recipe

from conftest import offline_env

BOUND = 3.0


@pytest.mark.parametrize(
    ("point", "at", "section", "hang"),
    [("step", 2, "step 2", "as step 2 of this launch begins"), ("load", 1, "loading", "as the model's load begins"),
     ("backward", 2, "step 2", "before backward 2 of this launch")],
    ids=["step", "load", "backward"],
)
def test_a_rank_stuck_is_named_and_the_job_ends_within_the_bound(
    assets: Any, tmp_path: Path, point: str, at: int, section: str, hang: str
) -> None:
    """In a step: rank 0 waits in the step's collective. Before its backward (its forward and loss done): rank 0 went
    on into its own backward and waits in its gradients' all-reduce, ahead of it, so rank 1 alone is named, with the
    point where it stopped. In the model's load (which counts no progress: the stuck
    rank's main thread stands still while rank 0, loaded, waits in a collective of the Trainer's set-up)."""
    out = tmp_path / "out"
    fault = {"point": point, "signal": "hang", "rank": 1, "at": at}
    runs = [{"recipe": recipe(assets, out, hera_watchdog_timeout=BOUND), "env": fault_env(fault)}]
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    env = offline_env(tmp_path, False, (), PYTHONUNBUFFERED="1", PYTHONPATH=str(HOOK), HERA_TEST_TEACHER_ROWS=ROWS)
    started = time.monotonic()
    proc = warm_script(PROBE, [str(tmp_path / "runs.json"), str(tmp_path / "out.pt")], 2, None, cwd=tmp_path,
                       env=env, timeout=300)
    printed = proc.stdout + proc.stderr
    (tmp_path / "printed.txt").write_text(printed, encoding="utf-8")  # for a failure's reader
    lines = re.findall(r"\[llamafactory-hera\] watchdog: rank (\d) on \S+, no progress for (\d+) s in ([^(]+) "
                       r"\(bound (\d+) s\): alive but stuck", printed)
    assert proc.returncode != 0 and f"[fault_injection] rank 1: HANG {hang}" in printed, printed[-4000:]
    assert len(lines) == 1 and lines[0][0] == "1" and lines[0][2] == section, printed[-4000:]
    if point == "backward":
        assert "alive but stuck after its forward, before its backward" in printed, printed[-4000:]
    hung = float(re.search(rf"HANG {re.escape(hang)} at (\d+\.\d)", printed)[1])
    ended = time.time() - hung  # to both ranks' end and the launch's return
    print(f"a rank stuck in {section} (bound {BOUND:.0f} s): named after {lines[0][1]} s without progress; the launch "
          f"returned {ended:.1f} s after the hang")
    # never before the bound; after it, within a slack that a loaded 2-core machine's late pulses fit (the step's
    # case once failed a 2 s slack there): the order is the gate, the seconds only a guard. In the load, the stuck
    # rank has stood still since the hang, and is named once the other, loaded, has waited in its collective for the
    # bound: the other's load is in the seconds too
    slack = 20
    assert BOUND <= int(lines[0][1]) <= BOUND + slack and ended < BOUND + 15 + slack, (lines, ended, printed[-3000:])
    assert time.monotonic() - started < 240 and "Traceback" not in printed, printed[-4000:]
