"""The sections reported to nvidia-resiliency-ext's rank monitor where its ``ft_launcher`` runs the job
(llamafactory_hera/training/watch_nvrx.py), with the real package: its ``RankMonitorServer`` (as ``ft_launcher``
starts one per rank) and a rank whose step overstays the step's section timeout, which the monitor ends (SIGKILL).
Skipped where the optional ``ft`` extra is not installed."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("nvidia_resiliency_ext") is None,
    reason="nvidia-resiliency-ext is not installed (the optional ft extra: pip install 'llamafactory-hera[ft]')")

# one process of its own: the rank monitor's server (forked, as ft_launcher starts it), then a rank that reports
# its sections through the plugin's reporter and overstays its step; printed: the rank's exit code and seconds
SCRIPT = """
import os, signal, subprocess, sys, time
from nvidia_resiliency_ext.fault_tolerance import FaultToleranceConfig, RankMonitorServer
socket_path = sys.argv[1]
config = FaultToleranceConfig(workload_check_interval=0.2, initial_rank_heartbeat_timeout=None,
                              rank_heartbeat_timeout=None, rank_section_timeouts={"loading": 60.0, "step": 1.5},
                              rank_out_of_section_timeout=60.0, rank_termination_signal=signal.SIGKILL)
server = RankMonitorServer.run_in_subprocess(config, socket_path)
rank = (
    "import sys, time\\n"
    "from llamafactory_hera.training import sections, watch_nvrx\\n"
    "reporter = watch_nvrx.reporter()\\n"
    "assert reporter is not None and reporter.known == {'loading', 'step'}, reporter\\n"
    "sections._running.append(reporter)\\n"
    "sections.enter('the teacher\\\\'s pass before step 1', 'teacher')\\n"
    "sections.progress()\\n"
    "sections.enter('step 1', 'step', 1)\\n"
    "print('in step 1', flush=True)\\n"
    "time.sleep(60)\\n"
)
env = {**os.environ, "FT_RANK_MONITOR_IPC_SOCKET": socket_path, "RANK": "0", "LOCAL_RANK": "0"}
process = subprocess.Popen([sys.executable, "-c", rank], env=env, stdout=subprocess.PIPE, text=True)
said = process.stdout.readline()  # the plugin's line: the sections go to the rank monitor
line = process.stdout.readline()
started = time.monotonic()
code = process.wait(timeout=60)
print(said.strip(), flush=True)
print(line.strip(), "|", code, "|", round(time.monotonic() - started, 1), flush=True)
server.terminate()
"""


def test_a_step_overstaying_its_section_timeout_is_ended_by_the_rank_monitor(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "monitor.socket")], capture_output=True,
                          text=True, timeout=120)
    said, code, seconds = proc.stdout.strip().splitlines()[-1].split(" | ")
    assert said == "in step 1" and code == "-9", (proc.stdout, proc.stderr[-3000:])
    assert proc.stdout.splitlines()[-2] == (
        "[llamafactory-hera] watchdog: this run's sections go to nvidia-resiliency-ext's rank monitor (ft_launcher), "
        "whose rank_section_timeouts bound them (loading, step).")
    assert 1.5 <= float(seconds) < 10, (seconds, proc.stderr[-3000:])
