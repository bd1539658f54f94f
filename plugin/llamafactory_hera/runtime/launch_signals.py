"""The launching process's side of a save signal (``llamafactory-cli`` before torchrun, ``accelerate launch``;
:mod:`.save_signal` is the ranks'). Imports nothing heavy.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llamafactory_hera.runtime.log import line
from llamafactory_hera.runtime.run_record import FINISHED, RUN_RECORD, STOPPED, read_record
from llamafactory_hera.runtime.save_signal import RERUN, WARNINGS, others, signal_number

_launch: dict[str, Any] = {"name": None, "output_dir": None, "since": 0, "received": False}


def leave_to_ranks(name: str | None, output_dir: Any = None) -> None:
    """Before the ranks start: ignore the save signal if a warning signal, and the other warning signals, here and in
    the launcher started from here (inherited, as by the ranks until their stage notes them): the scheduler signals
    every process, and SIGUSR1's default would end the agent (whose store the ranks agree through) and this process
    mid-save. SIGTERM stays the agent's: it passes it on and kills the ranks 30 s later; :func:`launching` keeps this
    process alive. ``none``: nothing."""
    number = signal_number(name)
    if number is None:
        return
    own = signal.Signals(number).name
    for ignored in [number, *others(own)] if own in WARNINGS else others(own):
        signal.signal(ignored, signal.SIG_IGN)
    _launch.update(name=own, output_dir=output_dir, since=time.time_ns())


def _note_in_launcher(signum: int, frame: Any) -> None:
    """SIGTERM to ``llamafactory-cli`` while its torchrun runs: torchrun got it too and passes it on; this process
    waits."""
    _launch["received"] = True


@contextlib.contextmanager
def launching() -> Iterator[None]:
    """With SIGTERM the save signal, ``llamafactory-cli`` outlives SIGTERM while its torchrun runs (under SLURM its end
    kills the ranks mid-save). A handler, not an ignore: torchrun gets the default."""
    if _launch["name"] != "SIGTERM" or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _note_in_launcher)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def ended(code: int) -> int:
    """The exit code for torchrun's ``code``: 0 when the ranks ended as asked, whatever the agent says: the run record
    (written since this launcher's checks) says stopped, or finished without error after this launcher got SIGTERM (in
    the final save). Else ``code``."""
    if not _launch["output_dir"]:
        return code
    record = read_record(Path(str(_launch["output_dir"])).expanduser() / RUN_RECORD)
    started = record.get("started_ns")
    status = record.get("status")
    finished = status == FINISHED and _launch["received"] and "error_after_save" not in record
    if not (status == STOPPED or finished) or not isinstance(started, int) or started < _launch["since"]:
        return code
    what = "saved and stopped" if status == STOPPED else "finished"
    go_on = f" To go on, {RERUN}." if status == STOPPED else ""
    print(
        line(
            f"{_launch['name']}: the ranks {what} (the run's record says {status}); torchrun's agent ended on the "
            f"signal (exit code {code}), this launch ends with 0.{go_on}"
        ),
        flush=True,
    )
    return 0
