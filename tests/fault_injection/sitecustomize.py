"""Test-only start-up hook: a fault at a chosen point of a rank (tests/test_fault_injection.py, tests/faults.py).

``HERA_TEST_FAULT`` holds one JSON fault for the ranks of a launch (``RANK`` set); a rank whose ``rank`` it names acts
when its count of the point's events reaches ``at`` (1-based, counted in this process):

- ``forward``: the ``at``-th decoder-layer forward inside a training step (a global forward pre-hook);
- ``backward``: as the ``at``-th backward inside a training step begins (its forward and loss done);
- ``optimizer``: the ``at``-th optimizer step, before (``when: pre``) or after (``post``) it changed the weights;
- ``write``: the ``at``-th file a checkpoint save writes (``torch.save``, safetensors' ``save_file``, the Trainer's
  ``trainer_state.json``; the end-of-run save included), counted from the ``save``-th checkpoint save on (default 1):
  killed before it (``when: before``) or with half of it written (``torn``); ``enospc``: that write fails for lack of
  space (``OSError`` ENOSPC) instead;
- ``marker``: at the ``at``-th whole checkpoint: before its marker (``before``), after it (``after``), or amid the
  rotation that follows (``rotate``: half of the files of the oldest checkpoint deleted);
- ``precompute``: the ``at``-th teacher forward of the pass before step 1 (``when: forward``), or right after its
  ``at``-th batch of rows was kept (``kept``);
- ``step``: as the ``at``-th training step begins;
- ``load``: as LLaMA-Factory's ``load_model`` begins (the trained model's load; head selection's own is not counted);
- ``selection``: head selection of ``hera_heads: auto``: its start on every rank (event 1), then each batch rank 0
  scores, before it is kept (events 2, 3, ...);
- ``directions``: as HARC's direction extraction before step 1 begins;
- ``final``: the ``at``-th file the end-of-run save writes (``when``: ``before`` or ``torn``, as ``write``).

What a due fault does is its ``signal``: ``sigkill`` (the default) kills the launch; ``sigstop`` stops this rank alone
(a frozen node; the test stops the rest of its node), which stays stopped until the launcher or the test kills it;
``hang`` blocks this rank's main thread for good while its other threads run on (a rank alive but stuck);
``sigterm`` / ``sigusr1`` go to every rank of the launch from this rank (as SLURM signals each task), or, where
``HERA_TEST_SIGNAL_FILE`` names a file (two simulated nodes: tests/test_multinode.py), the rank writes the signal's
name there and waits until the test, which sees every node, has sent it to every task and removed the file. A ``torn``
write or a ``rotate`` with another signal than ``sigkill`` acts before the write or the deletion instead.

Events before the ``step``-th training step of the launch (default: none) are not counted. A kill is SIGKILL to the
whole launch: the launcher first (so it cannot signal the ranks), then every other process it started, then this
rank (every process of a test's launch carries ``HERA_TESTS_LAUNCH``: tests/conftest.py ``run_process``). A fault's
upper-case ``signal`` (``SIGUSR1`` ...) is sent instead, to the same processes in the same order (as a scheduler
signals every process of a job); with ``agent_first`` (seconds), torchrun's agent (this rank's parent) alone is
SIGKILLed first, and the ranks run on that long before the kill.
``HERA_TEST_TEACHER_ROWS`` (a number) makes the teacher's passes batch and keep that many rows at a time, so that a
small data set's pass has several batches to be killed between (the uninterrupted run of a comparison sets it too).
A warm process (tests/warm_launch.py) installs the patches as a rank does, for the runs of its ranks without a fault
(a reference's teacher rows); a fault's kill finds the launch's processes by their start-up environment, which a
forked rank does not have: a fault is launched for real.
Then the next ``sitecustomize`` on the path runs (tests/fsdp_cpu/ or tests/process_hooks/):
Python runs only the first it finds.
"""

import errno
import importlib.util
import json
import os
import signal
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.append(os.path.join(os.path.dirname(HERE), "process_hooks"))
ROWS = int(os.environ.get("HERA_TEST_TEACHER_ROWS") or 0)
counts: dict = {}  # events counted per point, since the fault was last set (tests/dist_probe.py: per run)
state = {"step": False, "save": False, "final": False, "precompute": False, "selection": False,
         "fault": None}


def mine():
    """This rank's fault (read at each event: tests/dist_probe.py sets it per run), or None."""
    spec = os.environ.get("HERA_TEST_FAULT") if "RANK" in os.environ else None
    if spec != state["fault"]:
        state["fault"] = spec
        counts.clear()
    fault = json.loads(spec) if spec else None
    return fault if fault and int(fault.get("rank", 0)) == int(os.environ["RANK"]) else None


def _launch():
    """(the launch's processes from its root down, this rank's own process)."""
    import psutil

    me, mark = psutil.Process(), os.environ.get("HERA_TESTS_LAUNCH")
    top = me
    for parent in me.parents():
        try:
            if mark is None or parent.environ().get("HERA_TESTS_LAUNCH") != mark:
                break
        except psutil.Error:
            break
        top = parent
    return [top, *top.children(recursive=True)], me


def kill_launch(why: str) -> None:
    import psutil

    fault = mine() or {}
    name = fault.get("signal", "sigkill").upper()
    processes, me = _launch()  # before the agent goes: the ranks are found as its children
    if fault.get("agent_first"):
        print(f"[fault_injection] rank {os.environ['RANK']}: SIGKILL to torchrun's agent", flush=True)
        me.parent().kill()
        time.sleep(float(fault["agent_first"]))
    print(f"[fault_injection] rank {os.environ['RANK']}: {name} {why}", flush=True)
    for process in processes:
        if process.pid != me.pid:
            try:
                process.send_signal(getattr(signal, name))
            except psutil.Error:
                pass
    os.kill(os.getpid(), getattr(signal, name))


def act(why: str) -> None:
    """This rank's due fault: its ``signal`` sent (docstring)."""
    name, rank = (mine() or {}).get("signal", "sigkill"), os.environ["RANK"]
    if name == "sigkill" or name.isupper():  # an upper-case signal: to the whole launch, as a scheduler sends it
        kill_launch(why)
    elif name == "sigstop":
        print(f"[fault_injection] rank {rank}: SIGSTOP {why} at {time.time():.1f}", flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)
    elif name == "hang":
        print(f"[fault_injection] rank {rank}: HANG {why} at {time.time():.1f}", flush=True)
        while True:  # the main thread stuck, every other thread alive (a hung kernel, a lost peer of NCCL)
            time.sleep(60)
    elif os.environ.get("HERA_TEST_SIGNAL_FILE"):
        path = os.environ["HERA_TEST_SIGNAL_FILE"]
        print(f"[fault_injection] rank {rank}: {name.upper()} to every task {why}", flush=True)
        with open(path + ".tmp", "w") as handle:
            handle.write(name)
        os.replace(path + ".tmp", path)
        deadline = time.monotonic() + 120
        while os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.05)
    else:
        ranks = [process for process in _launch()[0] if "LOCAL_RANK" in process.environ()]
        print(f"[fault_injection] rank {rank}: {name.upper()} to {len(ranks)} ranks {why}", flush=True)
        for process in ranks:
            process.send_signal(getattr(signal, name.upper()))


def reached(point: str, when: str | None = None) -> bool:
    """Counts an event of ``point`` (with sub-point ``when``); True when this rank's fault is due at it."""
    fault = mine()
    if fault is None or fault["point"] != point or fault.get("when", when) != when or counts.get(
            "steps", 0) < fault.get("step", 0):
        return False
    counts[point] = counts.get(point, 0) + 1
    return counts[point] == int(fault["at"])


def _patch_torch(torch) -> None:
    save = torch.save

    def saving(obj, f, *args, **kwargs):
        return _write(f, lambda: save(obj, f, *args, **kwargs))

    torch.save = saving


def _patch_module(module) -> None:
    def pre_hook(layer, args):
        if state["step"] and type(layer).__name__.endswith("DecoderLayer") and reached("forward"):
            act(f"in the forward of {type(layer).__name__}")

    module.register_module_forward_pre_hook(pre_hook)


def _patch_accelerator(module) -> None:
    backward = module.Accelerator.backward

    def backward_begins(self, *args, **kwargs):
        if state["step"] and reached("backward"):
            act(f"before backward {counts['backward']} of this launch")
        return backward(self, *args, **kwargs)

    module.Accelerator.backward = backward_begins


def _patch_optimizer(module) -> None:
    def hook(when):
        def reached_in_step(optimizer, args, kwargs):
            if reached("optimizer", when):
                act(f"in optimizer step {counts['optimizer']} ({when} its update)")
        return reached_in_step

    module.register_optimizer_step_pre_hook(hook("pre"))
    module.register_optimizer_step_post_hook(hook("post"))


def _write(path, write):
    """One file a save writes: a fault due at it, else the write."""
    fault = mine() if state["save"] else None
    point = fault and fault["point"]
    if not (point in ("write", "enospc") and counts.get("saves", 0) >= fault.get("save", 1)
            or point == "final" and state["final"]):
        return write()
    counts["write"] = counts.get("write", 0) + 1
    if counts["write"] != int(fault["at"]):
        return write()
    if fault["point"] == "enospc":
        print(f"[fault_injection] rank {os.environ['RANK']}: ENOSPC writing {path}", flush=True)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    if fault.get("when") == "torn" and fault.get("signal", "sigkill") == "sigkill":
        result = write()
        with open(path, "r+b") as handle:
            handle.truncate(os.path.getsize(path) // 2)
        kill_launch(f"with {path} half-written")
        return result
    act(f"before writing {path}")
    return write()


def _patch_safetensors(module) -> None:
    save_file = module.save_file

    def saving(tensors, filename, *args, **kwargs):
        return _write(filename, lambda: save_file(tensors, filename, *args, **kwargs))

    module.save_file = saving


def _flagged(owner, name: str, flag: str, before=None) -> None:
    """``owner.name`` runs with ``state[flag]`` set (``before()`` first)."""
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
        if before is not None:
            before()
        previous, state[flag] = state[flag], True
        try:
            return original(*args, **kwargs)
        finally:
            state[flag] = previous

    setattr(owner, name, wrapped)


def _patch_trainer(module) -> None:
    trainer = module.Trainer

    def step_begins():
        if mine():
            counts["steps"] = counts.get("steps", 0) + 1
        if reached("step"):
            act(f"as step {counts['steps']} of this launch begins")

    def final_save(save_model):
        def saving(self, *args, **kwargs):  # outside a checkpoint's save: the end-of-run save
            previous, state["final"] = state["final"], not state["save"]
            try:
                return save_model(self, *args, **kwargs)
            finally:
                state["final"] = previous
        return saving

    _flagged(trainer, "training_step", "step", step_begins)
    _flagged(trainer, "_save_checkpoint", "save", lambda: mine() and counts.update(saves=counts.get("saves", 0) + 1))
    _flagged(trainer, "save_model", "save")  # the end-of-run save too
    trainer.save_model = final_save(trainer.save_model)  # outermost: it sees whether a checkpoint's save runs
    save_to_json = module.TrainerState.save_to_json

    def state_to_json(self, path):
        return _write(path, lambda: save_to_json(self, path))

    module.TrainerState.save_to_json = state_to_json


def _patch_whole(module) -> None:
    write_marker, rotate = module.write_marker, module.rotate

    def marking(folder, *args):
        if reached("marker", "before"):
            act(f"before marking {folder} whole")
        write_marker(folder, *args)
        if reached("marker", "after"):
            act(f"after marking {folder} whole")

    def rotating(run, limit, keep):
        olds = module.whole_checkpoints(run)[:-limit] if limit and limit > 0 else []
        if olds and reached("marker", "rotate"):
            if mine().get("signal", "sigkill") != "sigkill":
                act(f"before deleting {olds[0]}")
                return rotate(run, limit, keep)
            files = sorted(path for path in olds[0].rglob("*") if path.is_file())
            for path in files[: len(files) // 2]:
                path.unlink()
            kill_launch(f"amid deleting {olds[0]}")
        rotate(run, limit, keep)

    module.write_marker, module.rotate = marking, rotating


def _patch_teacher(module) -> None:
    if ROWS:
        module.KEEP_ROWS = ROWS
    forward = module.VisionTeacher.forward

    def teacher_forward(self, *args, **kwargs):
        if state["precompute"] and reached("precompute", "forward"):
            act(f"in teacher forward {counts['precompute']} of the pass before step 1")
        return forward(self, *args, **kwargs)

    module.VisionTeacher.forward = teacher_forward


def _patch_teacher_run(module) -> None:
    if ROWS:
        module.teacher_batch_size = lambda batch_size: ROWS
    _flagged(module.RunTeacher, "precompute", "precompute")


def _patch_teacher_cache(module) -> None:
    add = module.TeacherFeatureStore.add

    def adding(self, *args, **kwargs):
        result = add(self, *args, **kwargs)
        if state["precompute"] and reached("precompute", "kept"):
            act(f"after the pass before step 1 kept its rows {counts['precompute']} times")
        return result

    module.TeacherFeatureStore.add = adding


def _patch_loader(module) -> None:
    load_model = module.load_model

    def loading(*args, **kwargs):
        if not state["selection"] and reached("load"):
            act("as the model's load begins")
        return load_model(*args, **kwargs)

    module.load_model = loading


def _patch_selection(module) -> None:
    def selecting():
        if reached("selection"):
            act("as head selection begins")

    _flagged(module, "resolve_auto_heads", "selection", selecting)


def _patch_selection_batches(module) -> None:
    flush = module.PooledInputRecorder.flush

    def flushing(self):
        if state["selection"] and reached("selection"):
            act(f"in head selection, before its batch {counts['selection'] - 1} is kept")
        return flush(self)

    module.PooledInputRecorder.flush = flushing


def _patch_directions(module) -> None:
    start = module.HarcState.start

    def starting(self, *args, **kwargs):
        if reached("directions"):
            act("as HARC's direction extraction before step 1 begins")
        return start(self, *args, **kwargs)

    module.HarcState.start = starting


# a rank, or a warm process (tests/warm_launch.py) whose ranks it forks: each event reads the rank's own fault
if "RANK" in os.environ or "HERA_TESTS_WARM_PROCESS" in os.environ:
    from after_import import patch_after_import  # tests/process_hooks/

    patch_after_import({"torch": _patch_torch, "torch.nn.modules.module": _patch_module,
                        "torch.optim.optimizer": _patch_optimizer, "accelerate.accelerator": _patch_accelerator,
                        "safetensors.torch": _patch_safetensors,
                        "transformers.trainer": _patch_trainer,
                        "llamafactory_hera.runtime.whole_checkpoints": _patch_whole,
                        "llamafactory_hera.hera.teacher": _patch_teacher,
                        "llamafactory_hera.hera.teacher_run": _patch_teacher_run,
                        "llamafactory_hera.hera.teacher_cache": _patch_teacher_cache,
                        "llamafactory.model.loader": _patch_loader,
                        "llamafactory_hera.hera.selection.auto": _patch_selection,
                        "llamafactory_hera.hera.selection.collect": _patch_selection_batches,
                        "llamafactory_hera.harc.state": _patch_directions})

for _folder in sys.path:  # the next start-up hook on the path
    _next = os.path.join(_folder, "sitecustomize.py")
    if _folder and os.path.abspath(_folder) != HERE and os.path.isfile(_next):
        _spec = importlib.util.spec_from_file_location("_next_sitecustomize", _next)
        _spec.loader.exec_module(importlib.util.module_from_spec(_spec))
        break
