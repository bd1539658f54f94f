"""The lines the watchdog puts in the nodes' logs when it ends a job, and which errors are a failed collective."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

EXIT_CODE = 1
# short: the line naming the ranks stays under 400 characters at any scale (resume_from_checkpoint: true, which the
# shipped recipes and SLURM scripts set, continues from the newest whole checkpoint)
RERUN = "run the same command again to go on"


def ending(named: str) -> str:
    return f"watchdog: {named}. Every rank exits {EXIT_CODE}; {RERUN}."


def thawed(rank: int, host: str, stopped_s: float, why: str) -> str:
    why = why.removeprefix("watchdog: ").rstrip(".")
    return (
        f"watchdog: rank {rank} on {host} was stopped (its process or host frozen) and went on {stopped_s:.0f} s "
        f"later; meanwhile the job ended: {why}. Rank {rank} ends (exit {EXIT_CODE}); {RERUN}."
    )


def monitor_unheard(beat: dict[str, Any], seconds: float, store: str = "") -> str:
    return (
        f"rank 0 on {beat.get('host', '?')}, unheard for {seconds:.0f} s in {beat.get('section', '?')} (bound "
        f"{float(beat.get('bound') or 0):.0f} s): its process or host is frozen or gone{store}"
    )


def collective_failed(rank: int, host: str, section: str, error: BaseException) -> str:
    return (
        f"watchdog: rank {rank} on {host}: a collective in {section} failed ({first_line(error)}): another rank's "
        "process or node ended, or the network between them failed."
    )


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def distributed(error: BaseException) -> bool:
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        word in text for word in ("Connection reset by peer", "Connection closed by peer", "gloo", "NCCL")
    )
