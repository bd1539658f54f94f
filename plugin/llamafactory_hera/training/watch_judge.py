"""What the watchdog's monitor concludes from the ranks' heartbeats (pure). Whom it names and why: docs/multinode.md,
"What it watches".

A beat's position ``[step, place, progress]`` only grows while the rank works: a rank that stopped short of a
collective stays behind the ranks waiting in it. The monitor uses only its own clock. An unreadable beat changes
nothing: only a rank's own last beat says it left.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from llamafactory_hera.training.sections import SectionKind

# watched for progress, not only life: every kind (a load: its main thread's moves, training/watch_stack.py)
JUDGED = frozenset(SectionKind)
STORAGE_BOUND = 1800.0  # seconds an output_dir probe may go unanswered
PLACEHOLDER = b"-"  # a beat before its rank's first write (the monitor creates every key)


@dataclass
class Seen:
    """One rank as the monitor saw it."""

    beat: dict[str, Any] = field(default_factory=dict)
    heard: bool = False  # a beat of this launch was read
    pulse: Any = None
    position: Any = None
    beat_since: float = 0.0  # when its pulse count last changed
    moved_since: float = 0.0  # when its position last changed


@dataclass(frozen=True)
class Named:
    """A named rank: why (``unheard``, ``stuck``, ``never``, ``storage``), how long, its beat."""

    rank: int
    why: str
    seconds: float
    beat: dict[str, Any]
    alike: bool = False  # stuck, as every rank in the run is, at the same point (a collective that does not complete)


def parse(raw: bytes | None) -> dict[str, Any] | None:
    if not raw or raw == PLACEHOLDER:
        return None
    try:
        beat = json.loads(raw)
    except ValueError:
        return None
    return beat if isinstance(beat, dict) else None


class Judge:
    def __init__(self, ranks: list[int], now: float, first_bound: float) -> None:
        self.seen = {rank: Seen(beat_since=now, moved_since=now) for rank in ranks}
        self.started = now
        self.first_bound = first_bound

    def observe(self, rank: int, raw: bytes | None, now: float) -> None:
        beat = parse(raw)
        seen = self.seen[rank]
        if beat is None:
            return
        seen.beat = beat
        seen.heard = True
        if beat.get("pulse") != seen.pulse:
            seen.pulse = beat.get("pulse")
            seen.beat_since = now
        position = [beat.get("position"), beat.get("work")]  # work: its files' growth, which no rank compares
        if position != seen.position:
            seen.position = position
            seen.moved_since = now

    def paused(self, now: float) -> None:
        self.started = min(self.started, now)
        for seen in self.seen.values():
            seen.beat_since = seen.moved_since = now

    def named(self, now: float) -> list[Named]:
        found: list[Named] = []
        judged: dict[int, Seen] = {}
        for rank, seen in sorted(self.seen.items()):
            beat = seen.beat
            if not seen.heard:
                if now - self.started > self.first_bound:
                    found.append(Named(rank, "never", now - self.started, {"bound": self.first_bound}))
                continue
            if beat.get("left"):
                continue
            bound = float(beat.get("bound") or 0.0)
            if now - seen.beat_since > bound:
                found.append(Named(rank, "unheard", now - seen.beat_since, beat))
            elif float(beat.get("storage") or 0.0) > STORAGE_BOUND:
                found.append(Named(rank, "storage", float(beat["storage"]), beat))
            else:
                judged[rank] = seen
        return found or self._stuck(judged, now)

    def _stuck(self, judged: dict[int, Seen], now: float) -> list[Named]:
        """The stalled ranks at the lowest position of those that can hold the others up, if none there still moves:
        the one that stopped first alone, where the others went on to wait in the next collective. ``alike``: every
        rank still in the run is among them (no rank ahead, none done)."""
        stalled = {rank for rank, seen in judged.items() if _stalled(seen, now)}
        if not stalled:
            return []
        positions = {rank: _order(seen.beat) for rank, seen in judged.items()}
        lowest = min(positions.values())
        if any(positions[rank] == lowest and rank not in stalled for rank in judged):
            return []
        held = [rank for rank in sorted(stalled) if positions[rank] == lowest]
        if all(judged[rank].beat.get("kind") == SectionKind.LOADING for rank in held):
            held = _holding_up(held, judged)
        if all(judged[rank].beat.get("kind") == SectionKind.WAIT for rank in held):
            # the last barrier: a rank that entered its section but never reached the barrier holds up those in it
            held = [rank for rank in held if not judged[rank].beat.get("collective")] or held
        running = sum(1 for seen in self.seen.values() if seen.heard and not seen.beat.get("left"))
        waiting = all(
            judged[rank].beat.get("kind") not in (SectionKind.LOADING, SectionKind.WAIT)
            or judged[rank].beat.get("collective")
            for rank in held
        )
        alike = len(held) > 1 and len(held) == running and waiting
        return [Named(rank, "stuck", now - judged[rank].moved_since, judged[rank].beat, alike) for rank in held]


def _holding_up(loading: list[int], judged: dict[int, Seen]) -> list[int]:
    """Of the ranks stalled in their load, those that hold the others up. None while no rank waits in a collective:
    every rank busy in a slow load of its own looks as stuck ones would."""
    if not any(seen.beat.get("collective") for seen in judged.values()):
        return []
    working = [rank for rank in loading if not judged[rank].beat.get("collective")]
    return working or loading


def _stalled(seen: Seen, now: float) -> bool:
    """Not moved within its bound, in a section watched for progress, not waiting on its storage."""
    beat = seen.beat
    return (
        str(beat.get("kind")) in JUDGED
        and not float(beat.get("storage") or 0.0)
        and now - seen.moved_since > float(beat.get("bound") or 0.0)
    )


def _order(beat: dict[str, Any]) -> tuple[float, ...]:
    kind = str(beat.get("kind"))
    position = list(beat.get("position") or [0, SectionKind(kind).place if kind in JUDGED else 0, 0])
    if kind == SectionKind.LOADING:  # its count is of its main thread's moves: no two ranks' compare
        position[2:] = [0]
    return tuple(float(value) for value in position)


# the most the names of the job's last line take (more reasons than fit are counted): watch_lines.ending adds 68
# characters, and the whole line stays under 400 at any scale
LINE_CHARS = 330
SHOWN = 3  # rank ranges and hosts named in a clause; the rest are counted


def _group(named: list[Named]) -> list[list[Named]]:
    groups: dict[tuple[str, str, str], list[Named]] = {}
    for entry in named:
        point = str(entry.beat.get("point", "")) if entry.why == "stuck" else ""
        key = (entry.why, str(entry.beat.get("section", "?")), point)
        groups.setdefault(key, []).append(entry)
    return list(groups.values())


def _ranks(group: list[Named]) -> str:
    """``rank 5``, ``ranks 0, 1``, ``ranks 0-1023, 1025-4095 (4,095 ranks)``: runs as ranges, the first few."""
    ranks = sorted(entry.rank for entry in group)
    runs: list[list[int]] = []
    for rank in ranks:
        if runs and rank == runs[-1][-1] + 1:
            runs[-1].append(rank)
        else:
            runs.append([rank])
    spans = [f"{run[0]}-{run[-1]}" if len(run) > 2 else ", ".join(map(str, run)) for run in runs[:SHOWN]]
    more = f" and {len(runs) - SHOWN} more ranges" if len(runs) > SHOWN else ""
    listed = sum(len(run) for run in runs[:SHOWN] if len(run) <= 2)  # written out one by one
    count = f" ({len(ranks):,} ranks)" if len(runs) > 1 and len(ranks) > listed else ""
    return f"rank{'s' * (len(ranks) > 1)} {', '.join(spans)}{more}{count}"


def _hosts(group: list[Named]) -> str:
    hosts = list(dict.fromkeys(str(entry.beat.get("host", "?")) for entry in sorted(group, key=lambda e: e.rank)))
    more = f" and {len(hosts) - SHOWN} more hosts" if len(hosts) > SHOWN else ""
    return ", ".join(hosts[:SHOWN]) + more


def described(named: list[Named]) -> str:
    """The named ranks, one clause per reason, section and point, as many as fit in :data:`LINE_CHARS` with a count of
    the rest."""
    clauses: list[str] = []
    groups = _group(named)
    for group in groups:
        clause = _clause(group)
        if clauses and len("; ".join([*clauses, clause])) > LINE_CHARS - len(_rest(len(named))):
            break
        clauses.append(clause)
    rest = sum(len(group) for group in groups[len(clauses) :])
    return "; ".join(clauses + ([_rest(rest)] if rest else []))


def _rest(count: int) -> str:
    return f"and {count:,} more rank{'s' * (count > 1)} named for other reasons or sections"


def _clause(group: list[Named]) -> str:
    first = group[0]
    seconds = max(entry.seconds for entry in group)
    bound = float(first.beat.get("bound", 0) or 0)
    where = f"{_ranks(group)} on {_hosts(group)}"
    section = first.beat.get("section", "?")
    if first.why == "unheard":
        return (
            f"{where}, unheard for {seconds:.0f} s in {section} (bound {bound:.0f} s): its process or host is frozen "
            "or gone"
        )
    if first.why == "stuck":
        point = f" {first.beat['point']}" if first.beat.get("point") else ""
        why = (
            "; every rank stopped at the same point: a collective that does not complete"
            if first.alike
            else " (a kernel, a collective, a lost peer of NCCL)"
        )
        stopped = f"no progress for {seconds:.0f} s in {section} (bound {bound:.0f} s)"
        return f"{where}, {stopped}: alive but stuck{point}{why}"
    if first.why == "storage":
        return (
            f"{where}: output_dir's file system has not answered for {seconds:.0f} s in {section} (bound "
            f"{STORAGE_BOUND:.0f} s)"
        )
    return (
        f"{_ranks(group)}, never heard in this launch ({seconds:.0f} s, bound {bound:.0f} s): its run did not start "
        "(its node's launcher, or an error before the run)"
    )
