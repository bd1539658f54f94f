"""A plugin run's watchdog: a rank frozen, gone or stuck ends the job within its section's bound, with one line naming
rank, host and section in every node's log. docs/multinode.md ("A node that freezes, dies or hangs").

Each rank's thread makes two store calls a pulse: a read, then its heartbeat. Rank 0's thread is the monitor: it
judges every beat, read in one ``multi_get``; the others read rank 0's beat (its verdict, the stop step) and end the job
themselves if rank 0 or the store falls silent. Under ``ft_launcher``, ``watch_nvrx`` replaces it.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch.distributed as dist

from llamafactory_hera.runtime import elastic, job_store
from llamafactory_hera.runtime.log import say, say_apart
from llamafactory_hera.training import sections, watch_lines, watch_nvrx, watch_stop
from llamafactory_hera.training.watch_bounds import (
    NOTICE_S,
    Place,
    StorageProbe,
    bound,
    job_client,
    lengthen_groups,
    place_of,
    pulse_for,
    short_ddp_timeout,
)
from llamafactory_hera.training.watch_growth import Growth
from llamafactory_hera.training.watch_judge import PLACEHOLDER, Judge, described
from llamafactory_hera.training.watch_stack import MainThread
from llamafactory_hera.training.watch_stop import StopStep

PAUSED = 3  # pulses: a longer gap in its own pulses means this rank was stopped (SIGSTOP, swap)


class Watchdog:
    """This rank's heartbeat, its monitor role on rank 0, and the end of the job."""

    def __init__(
        self,
        place: Place,
        store: Any,
        keys: job_store.Keys,
        timeout: float | None,
        output_dir: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.place = place
        self.store = store
        self.keys = keys
        self.timeout = timeout
        self.clock = clock
        self.pulse_s = pulse_for(timeout)
        self.last: dict[sections.SectionKind, float] = {}  # kind -> the last such section's seconds
        self.state = sections.Where("loading", sections.SectionKind.LOADING, 0)  # read by the threads: one write
        self.since = clock()
        self.count = 0
        self.point = ""  # where in the section the last progress left this rank (sections.reached)
        self.lengthened = False
        self.pulses = 0
        self.verdict = ""
        self.probe = StorageProbe(output_dir, clock)
        self.main = MainThread()  # the run's thread: built on it
        self.moves = 0  # the pulses at which it had moved (the load's progress)
        self.growth = Growth(output_dir, walks=place.says)
        self.work = 0  # the pulses at which the files being written grew: progress no two ranks compare
        self.judge = Judge(list(range(place.world)), clock(), job_store.start_bound()) if place.rank == 0 else None
        self.monitor = {"beat": {}, "pulse": None, "since": clock()}  # rank 0's beat as last read
        self.stopped = threading.Event()
        self.entered = threading.Event()
        self.ending = threading.Lock()
        self.in_call: float | None = None
        self.failing: float | None = None
        self.guarded = self.moved = clock()
        self.seen_position: Any = None
        self.published: tuple[Any, ...] = ()  # what the last beat said that is news (:meth:`_news`)
        self.due = clock()  # the next pulse
        self.wrote_early = False  # this pulse's write was taken by news
        self.stopping = StopStep(self.entered, self.pulse_s)
        self.paused_at: float | None = None  # when this rank found it was stopped
        self.paused_s = 0.0
        self.threads = [
            threading.Thread(target=target, name=f"llamafactory-hera-watchdog-{name}", daemon=True)
            for name, target in (("pulse", self._run), ("guard", self._guard))
        ]

    def enter(self, section: str, kind: sections.SectionKind | str, step: int | None = None) -> None:
        """This rank is now in ``section`` of ``kind``; the previous one is timed."""
        now = self.clock()
        previous = self.state
        self.last[previous.kind] = now - self.since
        self.state = sections.Where(section, sections.SectionKind(kind), previous.step if step is None else step)
        self.since = now
        self.count = 0
        self.point = ""
        if kind == sections.SectionKind.STEP and not self.lengthened:
            # the Trainer has made its engine's groups by now (DeepSpeed's, FSDP2's meshes): each waits as ddp_timeout
            self.lengthened = True
            lengthen_groups()
        self.entered.set()  # published soon: a rank freezing next is named here

    def progress(self) -> None:
        self.count += 1

    def reached(self, point: str) -> None:
        self.point = point
        self.count += 1

    def _progress(self) -> int:
        return self.moves if self.state.kind == sections.SectionKind.LOADING else self.count

    def where(self) -> sections.Where:
        return self.state

    def bound(self) -> float:
        return bound(self.state.kind, self.last, self.timeout)

    def beat(self) -> bytes:
        where = self.state
        self.pulses += 1
        beat = {
            "host": self.place.host,
            "node": self.place.node,
            "pid": os.getpid(),
            "section": where.name,
            "kind": where.kind.value,
            "bound": self.bound(),
            "pulse": self.pulses,
            "position": [where.step, where.kind.place, self._progress()],
            "work": self.work,
            "storage": self.probe.waiting(self.pulse_s),
            "collective": self.main.in_collective,
        }
        if self.point:  # where the rank stopped, should it stop here (the position orders, this says)
            beat["point"] = self.point
        if self.verdict:
            beat["verdict"] = self.verdict
        beat.update(self.stopping.fields(self.judge is not None))
        if self.stopped.is_set():
            beat["left"] = True
        return json.dumps(beat).encode()

    def _call(self, call: Callable[[], Any]) -> Any:
        """A store call; None when it failed."""
        self.in_call = self.clock()
        try:
            result = call()
            self.failing = None
            return result
        except (RuntimeError, ValueError, OSError):
            self.failing = self.failing or self.clock()
            return None
        finally:
            self.in_call = None

    def _run(self) -> None:
        self._placeholders()
        while not self.stopped.is_set():
            self.entered.clear()
            self.entered.wait(self._turn())  # to the pulse, or news first

    def _placeholders(self) -> None:
        """Rank 0's: every key the monitor reads exists from the start (``multi_get`` waits for a missing one)."""
        if self.judge is not None:
            for rank in range(self.place.world):
                self._call(lambda rank=rank: self.store.compare_set(self.keys.beat(rank), "", PLACEHOLDER))

    def _turn(self) -> float:
        """One wake of the pulse thread; the seconds to the next. News (a rank freezing as a save begins is named in
        its save) is written at once when this pulse's write is free, else at the pulse: at most one write a pulse."""
        if self.judge is not None and self.stopping.signalled is not None:
            self.stopping.agree(self.state.step, [self.stopping.signalled])
        now = self.clock()
        if now >= self.due:
            # a stop being agreed: a tenth of a pulse apart, a few seconds once (training/watch_stop.py)
            self.due = now + (self.pulse_s / 10 if self.stopping.pending(self.judge is not None) else self.pulse_s)
            self._pulse()
            if not self.wrote_early:
                self._publish()
            self.wrote_early = False  # the next pulse's write is free
        if self._news() != self.published and not self.wrote_early:
            self._publish()  # the next pulse's write, at once
            self.wrote_early = True
        return max(0.0, self.due - self.clock())

    def _news(self) -> tuple[Any, ...]:
        """What a beat says at once."""
        return self.state.kind, self.stopping.signalled, self.stopping.step, self.stopping.everyone

    def _publish(self) -> None:
        self.published = self._news()
        self._call(lambda: self.store.set(self.keys.beat(self.place.rank), self.beat()))

    def _pulse(self) -> None:
        if self.main.look():
            self.moves += 1  # LLaMA-Factory's load counts nothing: its main thread's moves stand for progress
            # nor do the end's uploads (push_to_hub, a logger's model upload) and the load of selection's scoring copy
            # (its loader's threads reading shards): the main thread's moves are work there too
            if self.state.kind in (sections.SectionKind.FINAL, sections.SectionKind.SELECTION):
                self.work += 1
        self.work += self.growth.look(self.state.kind, self._progress(), self.main.in_collective)
        if self.main.compiling:
            self.work += 1  # a recompile reaches no point for minutes: torch's compiler busy is its work
        position = (self.state.kind, self.state.step, self._progress(), self.work)
        if position != self.seen_position:
            self.seen_position = position
            self.moved = self.clock()
        elif self.clock() - self.moved >= 2 * self.pulse_s:
            self.probe.ask()
        if self.judge is not None:
            self._judge()
        else:
            self._hear_monitor()
        self._store_check()

    def _judge(self) -> None:
        keys = [self.keys.beat(rank) for rank in range(self.place.world)]
        raws = self._call(lambda: self.store.multi_get(keys))
        for rank, raw in enumerate(raws or ()):
            self.judge.observe(rank, raw, self.clock())
        signalled = watch_stop.signalled(raws or ())
        if signalled:
            self.stopping.agree(self.state.step, signalled)
        self.stopping.count(seen.beat for seen in self.judge.seen.values())
        named = self.judge.named(self.clock()) if raws is not None and not self.stopped.is_set() else []
        if named:
            self.verdict = watch_lines.ending(described(named))
            self._publish()
            self.end(self.verdict)

    def _hear_monitor(self) -> None:
        key = self.keys.beat(0)
        # one call: rank 0's beat, or its placeholder set here before rank 0 started (a get would wait for it)
        raw = self._call(lambda: self.store.compare_set(key, "", PLACEHOLDER))
        beat = json.loads(raw) if raw and raw != PLACEHOLDER else None
        if isinstance(beat, dict):
            if beat.get("pulse") != self.monitor["pulse"]:
                self.monitor.update(beat=beat, pulse=beat.get("pulse"), since=self.clock())
            self.stopping.heard(beat)
            if beat.get("verdict"):
                self.end(self._thawed(beat["verdict"]) if self._was_paused() else beat["verdict"])
                return
        heard = self.monitor["beat"]
        unheard = self.clock() - self.monitor["since"]
        if heard and not heard.get("left") and unheard > float(heard.get("bound") or 0):
            self.end(watch_lines.ending(watch_lines.monitor_unheard(heard, unheard)))

    def _store_check(self) -> None:
        """End the job when the store fails or does not answer for longer than rank 0's bound."""
        since = self.failing if self.failing is not None else self.in_call
        if since is None or self.stopped.is_set():
            return
        limit = float(self.monitor["beat"].get("bound") or self.bound())
        if self.clock() - since > limit:
            store = (  # rank 0's beat is as old as the last read: say where this rank is
                f"; the job's store at {self.place.store} does not answer either (rank {self.place.rank} is in "
                f"{self.state.name})"
            )
            if self._was_paused():
                self.end(self._thawed(f"the job's store at {self.place.store} no longer answers"), store=False)
            elif self.judge is None and self.monitor["beat"]:
                seconds = self.clock() - self.monitor["since"]
                unheard = watch_lines.monitor_unheard(self.monitor["beat"], seconds, store)
                self.end(watch_lines.ending(unheard), store=False)
            else:
                silent = f"the job's store at {self.place.store} has not answered for {limit:.0f} s"
                self.end(watch_lines.ending(silent), store=False)

    def _guard(self) -> None:
        """Note this rank's own pause (a clock jump) and bound a store call that never returns; it calls no store."""
        while not self.stopped.wait(self.pulse_s / 2):
            now = self.clock()
            if now - self.guarded > PAUSED * self.pulse_s:
                self._paused(now)
            self.guarded = now
            self._store_check()

    def _paused(self, now: float) -> None:
        self.paused_at = now
        self.paused_s = now - self.guarded
        self.monitor["since"] = now
        if self.judge is not None:
            self.judge.paused(now)

    def _was_paused(self) -> bool:
        now = self.clock()
        recent = self.paused_at is not None and now - self.paused_at < (PAUSED + 2) * self.pulse_s
        return recent or now - self.guarded > PAUSED * self.pulse_s

    def _thawed(self, why: str) -> str:
        stopped = self.paused_s if self.paused_at is not None else self.clock() - self.guarded
        return watch_lines.thawed(self.place.rank, self.place.host, stopped, why)

    def end(self, line: str, store: bool = True) -> None:
        """Say ``line`` (one rank a node), wait briefly for the other nodes' logs to hold it, and exit (once)."""
        if not self.ending.acquire(blocking=False):
            return
        if self.place.says:
            say_apart(line)
        if store:  # bounded: a silent store must not keep this process
            told = (self.store, self.keys, self.place.node, self.place.says, self.place.rank == 0, self.place.nodes)
            waiting = threading.Thread(target=job_store.wait_told, args=(*told, NOTICE_S + self.pulse_s), daemon=True)
            waiting.start()
            waiting.join(NOTICE_S + self.pulse_s)
        os._exit(watch_lines.EXIT_CODE)

    def ended_meanwhile(self, error: BaseException) -> None:
        """A collective failed in the main thread: if this rank was stopped meanwhile, say the job's end and exit;
        else say which collective failed."""
        if not watch_lines.distributed(error):
            return
        first = watch_lines.first_line(error)
        if self._was_paused():
            raw = self._call(lambda: self.store.get(self.keys.beat(0))) if self.in_call is None else None
            verdict = (json.loads(raw).get("verdict") if raw and raw != PLACEHOLDER else None) or ""
            self.end(self._thawed(verdict or f"its collective failed ({first})"), store=False)
        section = sections.failed_in(error) or self.state.name  # a section block restored the one before it
        say_apart(watch_lines.collective_failed(self.place.rank, self.place.host, section, error))

    def start(self) -> None:
        """First beat first (rank 0's before its placeholders: no rank reads one of rank 0's), then the threads."""
        self._publish()
        self.wrote_early = True
        self._call(lambda: self.store.add(self.keys.started, 1))
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self.stopped.set()
        self.entered.set()
        self._publish()  # its beat says it left
        for thread in self.threads:
            thread.join(2 * self.pulse_s)  # a store call may be stuck on a frozen host


@contextlib.contextmanager
def watching(training_args: Any, timeout: float | None) -> Iterator[None]:
    """A run watched for the block (several processes, ``timeout`` not 0), left through a watched barrier: a rank
    frozen in rank 0's final save is named, and the host's teardown finds no rank in a collective."""
    dog: Any = None
    if training_args.world_size > 1 and timeout != 0:
        dog = watch_nvrx.reporter() or _started(training_args, timeout)
    if dog is not None:
        sections._running.append(dog)
    try:
        yield
        sections.enter("the last barrier (every rank's end)", sections.SectionKind.WAIT)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
    except BaseException as error:
        if isinstance(dog, Watchdog):
            dog.ended_meanwhile(error)
        raise
    finally:
        if dog is not None:
            sections._running.remove(dog)
            dog.stop()


def _started(training_args: Any, timeout: float | None) -> Watchdog | None:
    store = job_client(pulse_for(timeout))
    if store is None:
        return None
    keys = job_store.launch_mark(store, elastic.start_key())
    dog = Watchdog(place_of(training_args, store), store, keys, timeout, str(Path(training_args.output_dir)))
    warning = short_ddp_timeout(getattr(training_args, "ddp_timeout", None), timeout)
    if warning and dog.place.rank == 0:
        say(warning)
    dog.start()
    return dog
