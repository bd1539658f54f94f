"""Who a run is, for its output_dir claim (:mod:`.run_claim`): its job, rank and launch count, and whether a process
here still runs. Imports nothing heavy: it runs before the parse.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

_LOOPBACK = ("localhost", "::1")


def job_identity(env: Mapping[str, str] | None = None) -> str | None:
    """What the ranks of one job share (torchrun's run id and master, else an ``srun`` step); None for a single
    process."""
    # not a default: datasets' map(num_proc=N) rebinds os.environ
    env = os.environ if env is None else env
    run_id = env.get("TORCHELASTIC_RUN_ID")
    addr = env.get("MASTER_ADDR")
    port = env.get("MASTER_PORT")
    try:
        several = int(env.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        several = False
    if run_id is None and not (several and addr and port):
        return _slurm_step(env)
    if addr and (addr.startswith("127.") or addr in _LOOPBACK):
        addr = f"{socket.gethostname()}/{addr}"  # a loopback master: a job of this host alone
    return f"{run_id or ''}@{addr or ''}:{port or ''}"


def _slurm_step(env: Mapping[str, str]) -> str | None:
    try:
        several = int(env.get("SLURM_NTASKS", "1")) > 1
    except ValueError:
        several = False
    job = env.get("SLURM_JOB_ID")
    return f"slurm:{job}.{env.get('SLURM_STEP_ID', '')}" if several and job else None


def process_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) from ``/proc``; None where unreadable."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()
    return (fields[0], fields[19]) if len(fields) > 19 else None


def is_alive_here(pid: Any, process_start: Any = None) -> bool:
    """Whether process ``pid`` runs here: no zombie, and no later process with its id (given ``process_start``)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    except OSError:
        return False
    stat = process_stat(pid)
    if stat is None:
        return True
    return stat[0] != "Z" and (process_start is None or stat[1] == process_start)


def global_rank(env: Mapping[str, str]) -> int | None:
    for key in ("RANK", "SLURM_PROCID"):
        with contextlib.suppress(KeyError, ValueError):
            return int(env[key])
    return None


def restarts(env: Mapping[str, str]) -> int:
    try:
        return int(env.get("SLURM_RESTART_COUNT", "0") or 0)
    except ValueError:
        return 0
