"""Who a run is, for its output_dir claim (:mod:`.run_claim`): its process on this host, and the job its ranks share.

- a job's identity: ``TORCHELASTIC_RUN_ID`` and ``MASTER_ADDR:MASTER_PORT`` (torchrun, LLaMA-Factory's
  ``FORCE_TORCHRUN`` launch, ``accelerate launch``; the host name is added to a loopback address), or for another
  launcher ``MASTER_ADDR:MASTER_PORT`` with a ``WORLD_SIZE`` above 1, or Slurm's job step for several tasks started
  by ``srun`` (``SLURM_JOB_ID``, ``SLURM_STEP_ID``, ``SLURM_NTASKS`` above 1); a single process has none;
- its rank (``RANK``, else ``SLURM_PROCID``) and how often a scheduler has launched it (``SLURM_RESTART_COUNT``: a
  requeued job's later launch);
- whether a process of this host still runs (``/proc``: not a zombie, not a later process given the same id).

Imports nothing heavy: it runs before the parse.
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
    """What the ranks of one distributed job share (see the module docstring), or None for a single process."""
    # os.environ read at the call: datasets' map(num_proc=N) rebinds it to a copy, which a default keeps
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
    """The job step of Slurm tasks started by ``srun`` without torchrun (several tasks), or None."""
    try:
        several = int(env.get("SLURM_NTASKS", "1")) > 1
    except ValueError:
        several = False
    job = env.get("SLURM_JOB_ID")
    return f"slurm:{job}.{env.get('SLURM_STEP_ID', '')}" if several and job else None


def process_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) of a process, from ``/proc`` (None where it cannot be read)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()
    return (fields[0], fields[19]) if len(fields) > 19 else None


def is_alive_here(pid: Any, process_start: Any = None) -> bool:
    """Whether process ``pid`` of this host runs (not a zombie, and the same process where its start time was
    recorded: not a later one given the same id)."""
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
    """This process's rank in its job (torchrun's ``RANK``, Slurm's ``SLURM_PROCID``), None where neither is set."""
    for key in ("RANK", "SLURM_PROCID"):
        with contextlib.suppress(KeyError, ValueError):
            return int(env[key])
    return None


def restarts(env: Mapping[str, str]) -> int:
    """How often the scheduler has launched this job before (``SLURM_RESTART_COUNT``; 0 where it is not set)."""
    try:
        return int(env.get("SLURM_RESTART_COUNT", "0") or 0)
    except ValueError:
        return 0
