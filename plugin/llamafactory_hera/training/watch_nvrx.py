"""A plugin run's sections reported to nvidia-resiliency-ext's rank monitor when ``ft_launcher`` runs the job (the
``ft`` extra), in place of the plugin's watchdog. A kind listed in ``rank_section_timeouts`` opens a section by its
name; others count against ``rank_out_of_section_timeout``. Progress is a heartbeat, at most one a second.
"""

from __future__ import annotations

import importlib
import os
import time
from typing import Any

from llamafactory_hera.runtime.log import say_once
from llamafactory_hera.training.sections import SectionKind, Where

SOCKET_ENV = "FT_RANK_MONITOR_IPC_SOCKET"  # set by ft_launcher in every rank it starts
HEARTBEAT_S = 1.0


class Reporter:
    def __init__(self, client: Any) -> None:
        self.client = client
        self.open = None
        self.state = Where("loading", SectionKind.LOADING, 0)
        self.beaten = 0.0
        self.known = set(getattr(getattr(client, "cfg", None), "rank_section_timeouts", None) or ())

    def enter(self, section: str, kind: SectionKind | str, step: int | None = None) -> None:
        self.state = Where(section, SectionKind(kind), self.state.step if step is None else step)
        if kind == self.open:
            return
        if self.open is not None:
            self.client.end_section(self.open)
        # its value: the rank monitor's section names are strings
        self.open = self.state.kind.value if kind in self.known else None
        if self.open is not None:
            self.client.start_section(self.open)

    def progress(self) -> None:
        now = time.monotonic()
        if now - self.beaten >= HEARTBEAT_S:
            self.beaten = now
            self.client.send_heartbeat()

    def reached(self, point: str) -> None:
        self.progress()

    def where(self) -> Where:
        return self.state

    def stop(self) -> None:
        self.client.end_all_sections()
        self.client.shutdown_workload_monitoring()


def reporter() -> Reporter | None:
    if not os.environ.get(SOCKET_ENV):
        return None
    try:  # importlib: a run without the extra imports none of it
        tolerance = importlib.import_module("nvidia_resiliency_ext.fault_tolerance")
    except ImportError:
        return None
    client = tolerance.RankMonitorClient()
    client.init_workload_monitoring()
    found = Reporter(client)
    found.enter("loading", SectionKind.LOADING)
    say_once(
        "watchdog: this run's sections go to nvidia-resiliency-ext's rank monitor (ft_launcher), whose "
        f"rank_section_timeouts bound them ({', '.join(sorted(found.known)) or 'none listed'})."
    )
    return found
