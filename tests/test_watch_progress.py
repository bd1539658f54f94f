"""Healthy but slow work is progress to the watchdog (llamafactory_hera/training/watch_growth.py, sections.py,
checkpoints.py, watch_stack.py): a save's files growing, a download's bytes arriving, predict's and evaluate's
generate steps, the end of training in watched sections; and a main thread polling in place is not progress. On fake
clocks and a real TCPStore in this process; the monitor's verdicts on fake beats: tests/test_watch_judge.py."""

from __future__ import annotations

import json
import queue
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from test_checkpoint_trainer import _trainer
from transformers import Trainer

from llamafactory_hera.recipe.model_paths import hub_folder
from llamafactory_hera.runtime import job_store
from llamafactory_hera.training import checkpoints, sections, watch_growth, watch_stack
from llamafactory_hera.training.sections import SectionKind, Where
from llamafactory_hera.training.trainer_base import MethodTrainer
from llamafactory_hera.training.watch_bounds import Place
from llamafactory_hera.training.watch_growth import Growth
from llamafactory_hera.training.watch_judge import Judge
from llamafactory_hera.training.watch_stack import MainThread
from llamafactory_hera.training.watchdog import Watchdog


@pytest.fixture(autouse=True)
def _no_bytes_of_the_tests_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process's bytes written count as a rank's own writes; the test process writes its folders itself, so the
    walk's tests see the walk alone (the bytes' own test puts them back)."""
    monkeypatch.setattr(watch_growth, "written_bytes", lambda: 0)


def test_a_ranks_own_bytes_written_are_growth_and_only_a_nodes_first_rank_walks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bytes this process wrote to files (``/proc/self/io``) are growth, at no cost to the file system: a rank
    writing its own shard of a ZeRO-3 checkpoint moves. Only a node's first rank walks the folder (4,096 ranks walking
    a checkpoint of 8,000 files asked a metadata server millions of stats a second), and a walk stats at most
    ``WALKED`` files."""
    counted = [100]
    monkeypatch.setattr(watch_growth, "written_bytes", lambda: counted[0])
    folder = tmp_path / "checkpoint-4"
    growth = Growth(str(tmp_path), walks=False)
    with sections.writing(str(folder)):
        assert not _looked(growth, "save")
        counted[0] += 4096  # a log's lines (its output is a file under SLURM): no save's bytes
        assert not _looked(growth, "save")
        counted[0] += watch_growth.WROTE  # its shard's pages dirtied
        assert _looked(growth, "save") and not _looked(growth, "save")
        _grow(folder / "optimizer.pt", 1000)  # another rank's file: not this rank's, and it does not walk
        assert not _looked(growth, "save") and growth.thread is None
    for index in range(watch_growth.WALKED + 10):
        _grow(tmp_path / "many" / f"shard-{index}.pt", 1)
    assert watch_growth.measure(str(tmp_path / "many")) == (str(tmp_path / "many"), watch_growth.WALKED + 10,
                                                           watch_growth.WALKED)


def _grow(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as file:
        file.write(b"x" * size)


def _looked(growth: Growth, kind: str, waiting: bool = False, progress: int = 0) -> bool:
    """One pulse's look, its walk then finished (a pulse later in a run)."""
    grew = growth.look(kind, progress, waiting)
    if growth.thread is not None:
        growth.thread.join(30)
    return grew


def test_a_folder_being_written_grows_and_a_still_one_does_not(tmp_path: Path) -> None:
    """Each look compares the last two walks: bytes or files more (or fewer) is growth, the same is none. A rank
    waiting in a collective, or whose count moved since the last pulse, does not walk; outside a save with no folder
    named, nothing is walked."""
    folder = tmp_path / "checkpoint-4"
    growth = Growth(str(tmp_path))
    with sections.writing(str(folder)):
        grown = []
        for pulse in range(8):
            if pulse in (2, 3, 5):
                _grow(folder / "optimizer.pt", 1000)  # one file growing
            if pulse == 6:
                _grow(folder / "sub" / "rng.pth", 1)  # a new file below
            grown.append(_looked(growth, "step"))
        assert grown == [False, False, False, True, True, False, True, True]
        _grow(folder / "optimizer.pt", 1)
        assert [_looked(growth, "step", waiting=True) for _ in range(2)] == [False, False]  # no walk while waiting
        assert [_looked(growth, "step", progress=count) for count in (1, 2)] == [False, False]  # nor while counting
        assert [_looked(growth, "step", progress=2) for _ in range(2)] == [False, True]
    assert not _looked(growth, "step") and growth.thread is not None
    walks = growth.thread
    assert not _looked(growth, "step") and growth.thread is walks  # nothing named, no save: no walk


def test_the_final_save_with_no_folder_named_watches_output_dirs_own_files(tmp_path: Path) -> None:
    """The host's final save writes into output_dir itself: its files outside the checkpoints are walked."""
    _grow(tmp_path / "checkpoint-10" / "model.safetensors", 10)
    growth = Growth(str(tmp_path))
    _looked(growth, "final")
    _grow(tmp_path / "checkpoint-10" / "optimizer.pt", 10)  # a checkpoint's: not the final save's
    assert not _looked(growth, "final") and not _looked(growth, "final")
    _grow(tmp_path / "model.safetensors", 10)
    assert not _looked(growth, "final") and _looked(growth, "final")
    assert not _looked(growth, "save") and growth.seen is None  # a save names its folder: none named, none walked


def test_a_stalled_file_system_holds_the_walk_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A walk that never returns (every file-system call blocked): each look returns at once, no growth, and no
    second walk starts while the first waits."""
    release = threading.Event()
    walks: list[str] = []

    def blocked(folder: str, skip: tuple[str, ...] = ()) -> tuple[str, int, int]:
        walks.append(folder)
        release.wait(30)
        return folder, 0, 0

    monkeypatch.setattr(watch_growth, "measure", blocked)
    growth = Growth(str(tmp_path))
    with sections.writing(str(tmp_path)):
        assert [growth.look("save", 0, False) for _ in range(5)] == [False] * 5
    assert len(walks) == 1
    release.set()
    growth.thread.join(30)


def test_the_hub_cache_folder_of_a_download(tmp_path: Path) -> None:
    assert hub_folder("Qwen/Qwen2.5-VL-72B-Instruct", str(tmp_path)) == str(
        tmp_path / "models--Qwen--Qwen2.5-VL-72B-Instruct")
    assert hub_folder(str(tmp_path), None) is None  # a local model: nothing to download


# --- the watchdog on a fake clock: its own beats, read back by its own monitor (a job of one rank) ---


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def dog(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Rank 0 of one, default bounds, on a fake clock; its line kept instead of ending the process."""
    server = dist.TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=5), wait_for_workers=False)
    client = job_store.client("127.0.0.1", server.port, 5.0)
    place = Place(0, 1, 0, "node0", 1, "node0", f"127.0.0.1:{server.port}")
    watchdog = Watchdog(place, client, job_store.launch_mark(client), None, str(tmp_path), clock=_Clock())
    watchdog.lines = []
    monkeypatch.setattr(watchdog, "end", lambda line, store=True: watchdog.lines.append(line))
    monkeypatch.setattr(sections, "_running", [watchdog])
    yield watchdog
    server.check(["kept until here"])  # the store lives as long as its watchdog


def _pulse(dog: Watchdog, seconds: float = 5.0) -> None:
    """A pulse ``seconds`` later: the beat written and read back, the growth walk and the storage probe finished."""
    dog.clock.now += seconds
    dog.guarded = dog.clock.now  # its guard's tick (no guard thread here)
    dog._publish()
    dog._pulse()
    if dog.growth.thread is not None:
        dog.growth.thread.join(30)
    if dog.probe.thread is not None:  # the storage probe answered too: a pulse later in a run
        dog.probe.thread.join(30)


class _Moving:
    """The run's main thread as the pulse sees it: moving while ``moving`` (an upload hashing and sending its files, its
    bars counting), never in a collective, never compiling."""

    in_collective = False
    compiling = False

    def __init__(self) -> None:
        self.moving = True

    def look(self) -> bool:
        return self.moving


def _save(dog: Watchdog, folder: Path, seconds: int, growing_for: int) -> None:
    """A save of ``seconds`` whose optimizer file grows each pulse for its first ``growing_for`` seconds."""
    with sections.section(f"the save of {folder.name}", "save", files=str(folder)):
        for elapsed in range(0, seconds, 5):
            if elapsed < growing_for:
                _grow(folder / "optimizer.pt", 4096)
            _pulse(dog)


def test_a_save_whose_files_keep_growing_is_not_named_past_its_bound(dog: Watchdog, tmp_path: Path) -> None:
    """A 100 s save, then a 450 s one (bound 4 x 100 s = 400 s): named before its files grew; not while they grow.
    Then a save whose files stop growing is named once still for its bound."""
    dog.enter("step 1", "step", 1)
    _save(dog, tmp_path / "checkpoint-1", 100, 0)
    dog.enter("step 2", "step", 2)
    _pulse(dog)
    _save(dog, tmp_path / "checkpoint-2", 450, 450)
    assert dog.lines == [] and dog.last["save"] == 450.0
    dog.last["save"] = 100.0  # as after the 100 s save again
    dog.enter("step 3", "step", 3)
    _save(dog, tmp_path / "checkpoint-3", 600, 100)  # bound 400 s, still from 100 s on: named near 505 s
    assert dog.lines and "rank 0" in dog.lines[0] and "the save of checkpoint-3" in dog.lines[0], dog.lines


def test_an_upload_at_the_end_is_not_named_while_its_main_thread_moves(dog: Watchdog) -> None:
    """push_to_hub (LLaMA-Factory's model card and push), a logger's model upload in on_train_end: 900 s after the
    final save (bound 300 s), nothing counted, nothing written under output_dir; the main thread's moves are the work.
    Once it stands still, the rank is named a bound later."""
    dog.main = _Moving()
    dog.last = {"save": 50.0}
    dog.enter("the end of training (its callbacks)", "final")
    for _ in range(180):
        _pulse(dog)
    assert dog.lines == []
    dog.main.moving = False
    for _ in range(70):
        _pulse(dog)
    assert dog.lines and "rank 0" in dog.lines[0] and "the end of training" in dog.lines[0], dog.lines


def test_the_load_of_selections_scoring_copy_is_not_named_while_its_main_thread_moves(dog: Watchdog) -> None:
    """Rank 0 loads its scoring copy of a 72B model inside head selection (bound 1,800 s) from a slow shared file
    system for 2,500 s, before its first forward: its loader's threads reading the shards move the main thread (its
    CPU time counts theirs); once it stands still, it is named a bound later."""
    dog.main = _Moving()
    dog.enter("head selection", "selection")
    for _ in range(500):
        _pulse(dog)
    assert dog.lines == []
    dog.main.moving = False
    for _ in range(370):
        _pulse(dog)
    assert dog.lines and "rank 0" in dog.lines[0] and "head selection" in dog.lines[0], dog.lines


def test_a_first_download_in_head_selection_is_not_named_while_its_bytes_arrive(dog: Watchdog, tmp_path: Path) -> None:
    """Rank 0's scoring copy of a hub model, downloaded for 2,000 s before its first forward (bound 1,800 s): its
    blob in the hub's cache grows each pulse, so it is not named; once the bytes stop, it is, a bound later."""
    downloaded = hub_folder("org/large-model", str(tmp_path / "hub"))
    blob = Path(downloaded) / "blobs" / "a-blob.incomplete"
    dog.main = _Moving()
    dog.main.moving = False  # its main thread waits on the download's threads: the bytes alone are the work here
    with sections.section("head selection", "selection", forwards=True, files=downloaded):
        for _ in range(0, 2000, 5):
            _grow(blob, 4096)
            _pulse(dog)
        assert dog.lines == [] and dog.bound() == 1800.0
        for _ in range(0, 1900, 5):
            _pulse(dog)
    assert dog.lines and "head selection" in dog.lines[0], dog.lines


class _Generating(MethodTrainer):
    """A plugin trainer whose host predicts and evaluates with ``generate`` (a forward a token, no hook on the model
    seeing it: here the module below the one the trainer holds)."""


def _generating(dog: Watchdog, steps: int) -> Any:
    inner = torch.nn.Linear(2, 2)

    def generate(*args: Any, **kwargs: Any) -> str:
        for _ in range(steps):
            inner(torch.ones(1, 2))  # one token
            _pulse(dog)
        return "done"

    return generate


def test_an_8_minute_predict_and_evaluate_after_training_count_their_generate_steps(
        dog: Watchdog, monkeypatch: pytest.MonkeyPatch) -> None:
    """After training (the final save's bound: 300 s), a predict and an evaluate of 480 s each, a token each 5 s: in
    their own watched sections, never named. Between steps (eval_steps) evaluate stays in its step's section."""
    trainer = object.__new__(_Generating)  # its methods alone: no model, no data
    trainer.is_in_train = False
    dog.last = {"save": 50.0}
    dog.enter("the end of the run (final save)", "final")
    assert dog.bound() == 300.0
    monkeypatch.setattr(Trainer, "predict", _generating(dog, 96))
    monkeypatch.setattr(Trainer, "evaluate", _generating(dog, 96))
    seen = []
    publish = dog._publish

    def published() -> None:
        seen.append(dog.where()[:2])
        publish()

    monkeypatch.setattr(dog, "_publish", published)
    assert trainer.predict() == "done" and trainer.evaluate() == "done"
    assert dog.lines == [] and dog.where()[:2] == ("the end of the run (final save)", "final")
    assert ("the prediction (do_predict)", "final") in seen
    assert ("the evaluation (do_eval)", "final") in seen
    trainer.is_in_train = True
    dog.enter("step 7", "step", 7)
    seen.clear()
    monkeypatch.setattr(Trainer, "evaluate", _generating(dog, 2))
    counted = dog.count
    trainer.evaluate()
    assert set(seen) == {("step 7", "step")} and dog.count == counted + 2


class _Recorder:
    """A watchdog as ``training/sections.py`` sees one: each section entered with the folder being written then."""

    def __init__(self) -> None:
        self.state = Where("loading", SectionKind.LOADING, 0)
        self.entered: list[tuple[str, str]] = []

    def enter(self, section: str, kind: str, step: int | None = None) -> None:
        self.state = Where(section, kind, self.state.step if step is None else step)
        self.entered.append((section, kind))

    def progress(self) -> None:
        pass

    def reached(self, point: str) -> None:
        pass

    def where(self) -> Where:
        return self.state


def test_rotation_the_best_models_load_and_the_end_of_training_are_watched(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real Trainer (two steps, an evaluation each, load_best_model_at_end, save_total_limit: 1): the rotation runs
    in its save's section with the run folder watched for growth; after the last step the best model's load and the
    end-of-training callbacks are in ``final`` sections, not in the last step's."""
    dog = _Recorder()
    monkeypatch.setattr(sections, "_running", [dog])
    rotated = []
    rotate = checkpoints.whole.rotate
    monkeypatch.setattr(checkpoints.whole, "rotate",
                        lambda *args: (rotated.append((dog.where()[1], sections.written())), rotate(*args))[1])
    _trainer(tmp_path, max_steps=2, eval_strategy="steps", eval_steps=1, load_best_model_at_end=True,
             save_total_limit=1).train()
    assert rotated == [("save", str(tmp_path))] * 2
    after = dog.entered[dog.entered.index(("step 2", "step")):]
    assert after == [("step 2", "step"), ("the save of checkpoint-2", "save"), ("step 2", "step"),
                     ("the load of the best checkpoint", "final"), ("the end of training (its callbacks)", "final"),
                     ("the end of the run (final save)", "final")]


# --- the main thread's moves (the load's progress) ---


def test_a_thread_polling_in_place_does_not_move_and_a_working_one_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """As datasets' ``map(num_proc)`` waits on a deadlocked worker: a loop of 0.01 s timed waits on a queue, a tick of
    CPU time a 5 s pulse (fake clock and CPU time). Its stack goes round a few functions: once each was seen, it no
    longer moves. The same thread using a second of CPU time a pulse moves at each."""
    stop = threading.Event()
    jobs: queue.Queue[int] = queue.Queue()

    def poll() -> None:
        while not stop.is_set():
            try:
                jobs.get(timeout=0.01)
            except queue.Empty:
                pass

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    clock = _Clock()
    ticks = [0]
    monkeypatch.setattr(watch_stack, "_thread_ticks", lambda native_id: ticks[0])
    monkeypatch.setattr(watch_stack, "_children", list)  # the test process's own (a warm launcher) are not the run's
    looked = MainThread(poller, clock)

    def moves(looks: int, ticks_a_pulse: int) -> int:
        moved = 0
        for _ in range(looks):
            time.sleep(0.01)
            clock.now += 5.0
            ticks[0] += ticks_a_pulse
            moved += looked.look()
        return moved

    try:
        moves(30, 1)  # its few stacks seen
        assert moves(40, 1) <= 3
        assert moves(10, watch_stack.TICKS_S) == 10
    finally:
        stop.set()
        poller.join(5)


# --- the monitor's verdicts on fake beats ---


def _beat(pulse: int, position: list[int], kind: str, bound: float, work: int = 0, **more: Any) -> bytes:
    section = {"wait": "the last barrier (every rank's end)", "final": "the end of the run (final save)"}.get(
        kind, f"the save of checkpoint-{position[0]}")
    return json.dumps({"host": f"node{more.pop('rank', 0)}", "section": section, "kind": kind, "bound": bound,
                       "pulse": pulse, "position": position, "work": work, **more}).encode()


def _named(judge: Judge, now: float) -> list[tuple[int, str]]:
    return [(entry.rank, entry.why) for entry in judge.named(now)]


def test_a_save_whose_work_grows_is_not_named_and_its_waiting_peers_are_not_either() -> None:
    """Rank 0 writes a 450 s save (bound 400 s), its stages' count still 0 while its files grow (``work``); rank 1
    finished its stages (count 3) and waits in the save's collective. Nobody is named until rank 0's files stop
    growing; then rank 0 alone (rank 1 is ahead of it)."""
    judge = Judge([0, 1], now=0.0, first_bound=600)
    for t in range(0, 1001, 5):
        judge.observe(0, _beat(t, [4, 5, 0], "save", 400, work=min(t, 450) // 5), float(t))
        judge.observe(1, _beat(t, [4, 5, 3], "save", 400, rank=1, collective=True), float(t))
        if t <= 850:
            assert _named(judge, float(t)) == [], t
    assert _named(judge, 855.0) == [(0, "stuck")]


def test_the_last_barrier_is_judged_a_rank_hung_before_it_is_named_and_the_waiting_ones_are_not() -> None:
    """Ranks 0 and 2 wait in the last barrier (``wait``, 1,800 s); rank 1 hangs in the final save (bound 300 s): rank
    1 alone is named, within the wait bound. Every rank in the barrier, none moving: all are named together past the
    bound (a barrier that does not complete; before, ``wait`` was never judged). Rank 0 saving the final model, its
    files growing, while the others wait for 3,000 s: nobody."""
    judge = Judge([0, 1, 2], now=0.0, first_bound=600)
    for t in range(0, 401, 5):
        for rank in (0, 2):
            judge.observe(rank, _beat(t, [9, 7, 0], "wait", 1800, rank=rank, collective=True), float(t))
        judge.observe(1, _beat(t, [9, 6, 0], "final", 300, rank=1), float(t))
    assert _named(judge, 300.0) == [] and _named(judge, 301.0) == [(1, "stuck")]
    judge = Judge([0, 1], now=0.0, first_bound=600)
    for t in range(0, 1901, 5):
        for rank in (0, 1):
            judge.observe(rank, _beat(t, [9, 7, 0], "wait", 1800, rank=rank, collective=True), float(t))
    assert _named(judge, 1800.0) == [] and _named(judge, 1801.0) == [(0, "stuck"), (1, "stuck")]
    judge = Judge([0, 1], now=0.0, first_bound=600)
    for t in range(0, 3001, 5):
        judge.observe(0, _beat(t, [9, 6, 0], "final", 300, work=t // 5), float(t))
        judge.observe(1, _beat(t, [9, 7, 0], "wait", 1800, rank=1, collective=True), float(t))
        assert _named(judge, float(t)) == [], t


def test_this_processs_bytes_written_are_read_from_proc(monkeypatch: pytest.MonkeyPatch) -> None:
    """The counter the growth reads: it rises as this process writes a file (where /proc tells; 0 elsewhere)."""
    import os
    import tempfile

    monkeypatch.undo()  # the module's own counter, not the fixture's stand-in
    real = watch_growth.written_bytes
    before = real()
    with tempfile.NamedTemporaryFile() as file:
        file.write(b"x" * 65536)
        file.flush()
        os.fsync(file.fileno())
        after = real()
    assert after >= before + 65536 or (before == after == 0), (before, after)
