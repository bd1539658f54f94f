"""One rank of a case of the watchdog's campaign (tests/test_watch_campaign.py, launched by
tests/watch_campaign_launch.py): a plugin run as its rank goes through it, the plugin's real watchdog
(``watchdog.watching`` with ``hera_watchdog_timeout``'s one bound) and sections, on a real gloo process group and DDP.

The run enters what a plugin run enters, in its order: LLaMA-Factory's load (``main_process_first``: rank 0 maps first
while the others wait in its barrier), head selection (``hera_heads: auto``: rank 0 downloads and scores, the others
wait for its heads), the steps (the Trainer's step begin, the plugin's ``compute_loss`` count, the model's forward
under ``sections.counting_forwards``, DDP's backward, the optimizer's step), a checkpoint's save at the steps the case
names (as ``MethodTrainer._save_checkpoint``: unmark, the files, make durable, every rank's agreement, the marker,
then the rotation of ``save_total_limit``), the final save on rank 0, predict after training, and ``watching``'s last
barrier. Each function below that stands for plugin or host code names it: keep them in step with it.

A case's work is scaled by ONE time factor, its ``bound`` (seconds): every duration in a case is a multiple of it.
Healthy work that takes long:

- ``saves``: each save's seconds on rank 0 (in bounds), its optimizer file growing every 0.2 s (a busy Lustre, a 72B
  full-state-dict gather written as it comes);
- ``stall``: every file-system call on ``output_dir`` of rank 0's node blocks for that many bounds, 0.3 s into the
  save of step ``stall_step`` (a node's Lustre client stuck on a lock), after the other rank's own files;
- ``predict``: predict after training, many forwards (a 0.1 s generation each, gathered as the Trainer gathers);
- ``download``: head selection's first download of its scoring model, bytes arriving in the hub cache every 0.2 s;
- ``recompile``: rank 0's forward of step 2 busy on the CPU without a forward's end (dynamo and inductor on a new
  shape), its Python stack and CPU time moving; rank 1 waits in DDP's all-reduce meanwhile;
- ``rotate``: the rotation of a large checkpoint after the save (``save_total_limit: 1``), its files deleted slowly.

Faults (``fault``: ``rank``, ``point``, ``step``): ``sigstop`` (the rank stopped as its step's inputs are prepared: a
frozen process or host), ``forward`` / ``backward`` / ``optimizer`` (alive but stuck: the main thread blocked for good,
its threads alive, as the step's inputs are prepared, before the backward, in the optimizer's step), ``collective``
(never enters the save's agreement, the collective the plugin issues), ``barrier`` (never reaches the last barrier),
``poll`` (the load's main thread polls in place for good: a 0.05 s loop, as datasets' ``map(num_proc)`` with a
deadlocked worker). Each fault prints ``[campaign] rank R: WHAT at T`` (epoch seconds) as it acts.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import os
import signal
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch._dynamo  # noqa: F401 - DDP's first construction imports it: 5 CPU s a rank, paid once before the forks
import torch.distributed as dist
from huggingface_hub import constants
from torch import nn

from llamafactory_hera.recipe.model_paths import hub_folder
from llamafactory_hera.runtime import whole_checkpoints as whole
from llamafactory_hera.training import sections, watchdog

DDP_TIMEOUT = 180_000_000  # the shipped recipes' ddp_timeout (seconds)
GROW_S = 0.2  # a growing file's chunk interval
BATCHES = 4  # scoring forwards of head selection
PREDICT_S = 0.1  # a predict batch's generation
barrier = dist.barrier  # this module's own barriers: a ``barrier`` fault replaces dist.barrier, which watching() calls


class Tiny(nn.Module):
    """The trained model; its forward runs the case's recompile (rank 0, step 2) between the forward's hooks."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        self.recompile_s = 0.0

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.recompile_s:
            busy(self.recompile_s)
            self.recompile_s = 0.0
        return self.layers(inputs)


class Rank:
    """One rank's run of ``case``."""

    def __init__(self, case: dict[str, Any], output_dir: Path) -> None:
        self.case = case
        self.bound = float(case["bound"])
        self.rank = int(os.environ["RANK"])
        self.world = int(os.environ["WORLD_SIZE"])
        self.out = output_dir
        self.fault = case.get("fault") if int((case.get("fault") or {}).get("rank", -1)) == self.rank else None
        self.step = 0
        self.stall = (0.0, 0.0)  # rank 0's node: file-system calls on output_dir block from, until (epoch seconds)

    def seconds(self, key: str) -> float:
        return float(self.case.get(key) or 0) * self.bound

    # --- faults ---

    def at(self, point: str) -> bool:
        """Whether this rank's fault is due at ``point`` (in its step, when it names one)."""
        fault = self.fault
        return bool(fault and fault["point"] == point and int(fault.get("step", self.step)) == self.step)

    def act(self, what: str) -> None:
        """This rank's fault: stopped (``sigstop``) or stuck for good, said first."""
        verb = "SIGSTOP" if self.fault["point"] == "sigstop" else "HANG"
        print(f"[campaign] rank {self.rank}: {verb} {what} at {time.time():.2f}", flush=True)
        if verb == "SIGSTOP":
            os.kill(os.getpid(), signal.SIGSTOP)
            return
        while True:  # the main thread stuck, its other threads alive (a hung kernel, a lost peer)
            time.sleep(60)

    # --- the run ---

    def run(self) -> None:
        """The stage inside ``watching`` (plugin/llamafactory_hera/recipe/run.py), on the run's process group."""
        torch.set_num_threads(1)
        dist.init_process_group("gloo", timeout=timedelta(seconds=DDP_TIMEOUT))
        if self.at("barrier"):
            dist.barrier = self._never_arrives
        args = SimpleNamespace(world_size=self.world, process_index=self.rank, output_dir=str(self.out),
                               local_process_index=int(os.environ["LOCAL_RANK"]), ddp_timeout=DDP_TIMEOUT)
        with stalls(self) if self.case.get("stall") else contextlib.nullcontext(), watchdog.watching(args, self.bound):
            self.load()
            self.select()
            model = nn.parallel.DistributedDataParallel(Tiny())
            self.train(model)
            self.final(model.module)
        dist.destroy_process_group()
        print(f"[campaign] rank {self.rank}: done at {time.time():.2f}", flush=True)

    def load(self) -> None:
        """LLaMA-Factory's data load under ``main_process_first`` (rank 0 maps first, the others wait in its
        barrier), then the model's."""
        if self.rank:
            barrier()
        if self.at("poll"):
            print(f"[campaign] rank {self.rank}: HANG polling in its load at {time.time():.2f}", flush=True)
            poll_forever()
        time.sleep(0.2)
        if not self.rank:
            barrier()

    def select(self) -> None:
        """``hera_heads: auto`` (plugin/llamafactory_hera/hera/preparation.py ``prepare``): rank 0 downloads its scoring
        model and scores, the others wait in a collective for its heads."""
        if not self.case.get("download"):
            return
        kind = "selection" if self.rank == 0 else "wait"
        with sections.section("head selection", kind, forwards=True, files=hub_folder("campaign/scorer", None)):
            heads = [None]
            if self.rank == 0:
                # where the hub's library writes (its folder read at its import: a rank's is its launcher's)
                hub = Path(constants.HF_HUB_CACHE) / "models--campaign--scorer" / "blobs"
                grow(hub / "model-safetensors-blob.incomplete", self.seconds("download"), self, 64 * 1024)
                scorer = Tiny()
                for _ in range(BATCHES):
                    scorer(torch.randn(4, 8))
                heads = [[[0, 1], [1, 0]]]
            dist.broadcast_object_list(heads, src=0)

    def train(self, model: nn.Module) -> None:
        """``MethodTrainer.train`` (plugin/llamafactory_hera/training/trainer_base.py) around the Trainer's loop."""
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        optimizer.register_step_pre_hook(self._optimizer_step)
        saves = [float(s) * self.bound for s in self.case.get("saves") or []]
        with sections.counting_forwards(model.module):
            for step in range(1, int(self.case.get("steps", 3)) + 1):
                self.step = step
                sections.enter(f"step {step}", "step", step)  # StopOnSignal.on_step_begin
                if self.rank == 0 and step == 2:
                    model.module.recompile_s = self.seconds("recompile")
                if self.at("sigstop") or self.at("forward"):  # as the Trainer prepares the inputs
                    self.act(f"before the forward of step {step}")
                sections.reached(sections.FORWARD)  # MethodTrainer.compute_loss
                loss = model(torch.randn(4, 8)).pow(2).mean()
                loss.register_hook(sections._backward_begun)
                sections.reached(sections.BEFORE_BACKWARD)
                if self.at("backward"):
                    self.act(f"before the backward of step {step}")
                loss.backward()
                sections.reached(sections.OPTIMIZER)  # _OptimizerPoints
                optimizer.step()
                sections.reached(sections.AFTER_OPTIMIZER)
                optimizer.zero_grad()
                time.sleep(0.1)
                if step <= len(saves):
                    self.save_checkpoint(step, saves[step - 1])

    def _optimizer_step(self, *_: Any) -> None:
        if self.at("optimizer"):
            self.act(f"in the optimizer step of step {self.step}")

    def save_checkpoint(self, step: int, seconds: float) -> None:
        """``MethodTrainer._save_checkpoint``: rank 0 writes the model and optimizer (``seconds``, growing), each
        rank its RNG state; each stage done is progress; the ranks agree; rank 0 marks it whole, then rotates."""
        folder = self.out / f"{whole.CHECKPOINT_PREFIX}{step}"
        with sections.section(f"the save of {folder.name}", "save", files=str(folder)):
            whole.unmark(folder)
            folder.mkdir(parents=True, exist_ok=True)
            if step == int(self.case.get("stall_step", 0)) and self.rank == 0:
                start = time.time() + 0.3
                self.stall = (start, start + self.seconds("stall"))
            (folder / f"rng_state_{self.rank}.pth").write_bytes(os.urandom(1024))
            if self.rank == 0:
                grow(folder / "optimizer.pt", seconds, self, 64 * 1024)
                shards = 150 if self.case.get("rotate") and step == 1 else 1
                for shard in range(shards):  # a large checkpoint: many files
                    (folder / f"model-{shard:05d}.safetensors").write_bytes(b"\0" * 4096)
                (folder / whole.TRAINER_STATE).write_text("{}", encoding="utf-8")
            sections.progress()
            sections.progress()  # save_method_state
            whole.make_durable(folder)
            sections.progress()
            if self.at("collective"):
                self.act(f"before the save's agreement of {folder.name}")
            with sections.collective("the all-reduce that agrees every rank saved"):  # every_rank_saved
                dist.all_reduce(torch.ones(1))
            if self.rank == 0:
                whole.write_marker(folder, step, self.world, {})
            if self.rank == 0:
                per_file = self.seconds("rotate") / 150 if self.case.get("rotate") else 0.0
                with slow_unlinks(per_file), sections.writing(str(self.out)):
                    whole.rotate(self.out, 1 if self.case.get("rotate") else None, (None, folder))

    def final(self, model: nn.Module) -> None:
        """After ``super().train``: the final save (rank 0), then predict after training (LLaMA-Factory's workflow:
        ``trainer.predict``, each batch gathered over the ranks)."""
        sections.enter("the end of training (its callbacks)", "final")  # _RunEnds
        sections.enter("the end of the run (final save)", "final")
        if self.rank == 0:
            torch.save(model.state_dict(), self.out / "adapter_model.bin")
        if not self.case.get("predict"):
            return
        model.eval()
        with torch.no_grad(), sections.section("the prediction after training (do_predict)", "final", forwards=True):
            for _ in range(round(self.seconds("predict") / PREDICT_S)):  # the same count on every rank
                predicted = model(torch.randn(2, 8))
                time.sleep(PREDICT_S)  # a generation's tokens
                gathered = [torch.zeros_like(predicted) for _ in range(self.world)]
                dist.all_gather(gathered, predicted)
            dist.all_reduce(torch.ones(1))  # every rank's last batch

    def _never_arrives(self, *_: Any, **__: Any) -> None:
        """``dist.barrier`` of a rank that never reaches the last barrier (its own earlier barriers as before)."""
        self.act("as the last barrier begins")


def grow(path: Path, seconds: float, rank: Rank, chunk: int) -> None:
    """``path`` written a ``chunk`` every :data:`GROW_S` for ``seconds`` (each write waits out a storage stall)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + seconds
    with open(path, "wb") as handle:
        while True:
            rank_stalled(rank, str(path))
            handle.write(b"\0" * chunk)
            handle.flush()
            if time.monotonic() >= deadline:
                break
            time.sleep(GROW_S)


# a recompile's work, as code of torch's compiler (its frames' file is what the watchdog reads): the CPU busy in
# Python, moving between functions, no forward ending
_COMPILER = {}
exec(compile("""
def trace(graph):
    for node in range(2000):
        graph[node] = (graph.get(node, 0) * 31 + node) % 1009


def lower(graph):
    sum(sorted(graph.values())[:100])
""", "/site-packages/torch/_inductor/compile_fx.py", "exec"), _COMPILER)


def busy(seconds: float) -> None:
    """A recompile: torch's compiler busy on the CPU (dynamo's trace, inductor's lowering), no forward ending."""
    deadline = time.monotonic() + seconds
    graph: dict[int, int] = {}
    while time.monotonic() < deadline:
        _COMPILER["trace"](graph)
        _COMPILER["lower"](graph)


def poll_forever() -> None:
    """A main thread polling in place for good: a queue read with a 0.05 s timeout, then every result's ``ready()``
    (datasets' ``iflatmap_unordered``), its workers deadlocked. Each poll's CPU (about 1 ms: a manager queue's read
    pickled over a socket) keeps the CPU time per pulse near a real poll's at the default 5 s pulse."""
    results = [SimpleNamespace(done=False) for _ in range(64)]
    while True:
        time.sleep(0.05)
        if all(result.done for result in results):
            break
        _ready(results)


def _ready(results: list[SimpleNamespace]) -> None:
    deadline = time.thread_time() + 0.001
    while time.thread_time() < deadline:
        [result.done for result in results]


def rank_stalled(rank: Rank, path: str) -> None:
    """Wait while rank 0's node's file system stalls, for a call on ``path`` under ``output_dir``."""
    start, until = rank.stall
    now = time.time()
    if start <= now < until and (not path or path.startswith(str(rank.out))):
        time.sleep(until - now)


@contextlib.contextmanager
def stalls(rank: Rank) -> Iterator[None]:
    """Every file-system call on ``output_dir`` (by path; by descriptor: every one) waits out ``rank.stall``, in
    every thread (the watchdog's probe of ``output_dir`` too)."""
    names = ("stat", "lstat", "statvfs", "open", "fsync", "replace", "rename", "unlink", "rmdir", "mkdir", "listdir",
             "scandir")
    originals = {name: getattr(os, name) for name in names}

    def stalled(call: Any) -> Any:
        def waiting(path: Any = "", *args: Any, **kwargs: Any) -> Any:
            rank_stalled(rank, "" if isinstance(path, int) else os.fspath(path))
            return call(path, *args, **kwargs)

        return waiting

    opened = builtins.open
    for name, call in originals.items():
        setattr(os, name, stalled(call))
    builtins.open = io.open = stalled(opened)
    try:
        yield
    finally:
        for name, call in originals.items():
            setattr(os, name, call)
        builtins.open = io.open = opened


@contextlib.contextmanager
def slow_unlinks(per_file: float) -> Iterator[None]:
    """Each file's deletion takes ``per_file`` seconds (a parallel file system's unlink of a large checkpoint)."""
    unlink = os.unlink

    def slow(*args: Any, **kwargs: Any) -> None:
        time.sleep(per_file)
        unlink(*args, **kwargs)

    if per_file:
        os.unlink = slow
    try:
        yield
    finally:
        os.unlink = unlink
