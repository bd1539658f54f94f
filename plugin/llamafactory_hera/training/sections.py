"""Where a rank is in its run, told to its watchdog by the trainers and workflows: its section and progress.

Progress only grows while the rank works: a micro-step's points, forwards, save stages, a folder's files growing. A
point also says where the rank is until the next one: a rank that stopped short of a collective stays behind the
ranks waiting in it, and is named alone. Unwatched, nothing is hooked: a point costs an empty call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from enum import StrEnum
from typing import Any, NamedTuple, Protocol

import torch
from torch.nn.modules import module as nn_module
from transformers import TrainerCallback
from typing_extensions import override


class SectionKind(StrEnum):
    """What a section is: its first bound and how its progress is read. In the order of a kind's :attr:`place` along
    a step (a rank's positions compare along the run)."""

    LOADING = "loading"  # LLaMA-Factory's load: its main thread's moves stand for progress (watch_stack.py)
    SELECTION = "selection"  # HeRA's head selection, rank 0's scoring
    DIRECTIONS = "directions"  # HARC's direction extraction
    TEACHER = "teacher"  # HeRA's teacher pass before step 1
    STEP = "step"
    SAVE = "save"
    FINAL = "final"  # the end of the run: its final save, callbacks, evaluation, uploads
    WAIT = "wait"  # on another rank's work

    @property
    def place(self) -> int:
        return list(SectionKind).index(self)


class Where(NamedTuple):
    name: str
    kind: SectionKind
    step: int


class Watched(Protocol):
    def enter(self, section: str, kind: SectionKind | str, step: int | None = None) -> None: ...

    def progress(self) -> None: ...

    def reached(self, point: str) -> None: ...

    def where(self) -> Where: ...


_running: list[Watched] = []  # this process's watchdog (none or one)
_writing: list[str] = []  # the folders being written, innermost last: their files growing is progress
FORWARD = "in its forward"  # the point a forward begun leaves a rank at
FAILED_IN = "_llamafactory_hera_section"  # set on an error as it leaves its innermost section block


def failed_in(error: BaseException) -> str | None:
    """The section a watched run was in when ``error`` left its innermost section block (None: it left none)."""
    return getattr(error, FAILED_IN, None)


def enter(section: str, kind: SectionKind | str, step: int | None = None) -> None:
    """This rank is now in ``section`` (``step``: default the current); no-op unwatched."""
    for dog in _running:
        dog.enter(section, kind, step)


def progress(*_: Any) -> None:
    """One unit of progress; ignores a hook's arguments."""
    for dog in _running:
        dog.progress()


def watched() -> bool:
    """Whether a watchdog runs in this process."""
    return bool(_running)


def reached(point: str) -> None:
    """One unit of progress, after which this rank is ``point`` (``"in its backward"``); no-op unwatched."""
    for dog in _running:
        dog.reached(point)


@contextlib.contextmanager
def collective(name: str) -> Iterator[None]:
    """A collective of the plugin's for the block: a point as it begins and as it returns."""
    reached(f"in {name}")
    yield
    reached(f"after {name}")


@contextlib.contextmanager
def section(name: str, kind: SectionKind | str, *, forwards: bool = False, files: str | None = None) -> Iterator[None]:
    """``name`` for the block, then the previous section. ``forwards``: any module's forward is progress; ``files``: a
    folder the block writes."""
    before = [(dog, dog.where()) for dog in _running]
    enter(name, kind)
    try:
        with contextlib.ExitStack() as counted:
            if forwards:
                counted.enter_context(counting_every_forward())
            counted.enter_context(writing(files))
            yield
    except BaseException as error:
        # the block's end restores the section before it: the error keeps where it happened, for its line
        if _running and failed_in(error) is None:
            with contextlib.suppress(AttributeError, TypeError):
                setattr(error, FAILED_IN, _running[0].where().name)
        raise
    finally:
        for dog, previous in before:
            dog.enter(previous.name, previous.kind, previous.step)


@contextlib.contextmanager
def counting_every_forward() -> Iterator[None]:
    """Every module's forward in the block is progress (``generate``'s are under no hook on the model)."""
    hook = nn_module.register_module_forward_pre_hook(progress) if _running else None
    try:
        yield
    finally:
        if hook is not None:
            hook.remove()


@contextlib.contextmanager
def writing(folder: str | None) -> Iterator[None]:
    """``folder``'s files growing (or going) is progress in the block (None: none)."""
    if folder is None:
        yield
        return
    _writing.append(folder)
    try:
        yield
    finally:
        _writing.pop()


def written() -> str | None:
    """The folder being written now, innermost (read from the watchdog's thread)."""
    folders = list(_writing)  # one copy: the run's thread changes the list meanwhile
    return folders[-1] if folders else None


@contextlib.contextmanager
def counting_forwards(model: torch.nn.Module) -> Iterator[None]:
    """Each forward of ``model`` counts twice, as it begins (a point) and returns."""
    handles = []
    if _running:
        handles = [model.register_forward_pre_hook(_forward_begun), model.register_forward_hook(progress)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _forward_begun(*_: Any) -> None:
    reached(FORWARD)


BEFORE_BACKWARD = "after its forward, before its backward"
AFTER_FORWARD = "after its forward"  # an evaluation's: no backward follows
BACKWARD = "in its backward"
AFTER_BACKWARD = "after its backward"
OPTIMIZER = "in the optimizer step"
AFTER_OPTIMIZER = "after the optimizer step"


class OptimizerPoints(TrainerCallback):
    """The optimizer step's two points."""

    @override
    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        reached(OPTIMIZER)

    @override
    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        reached(AFTER_OPTIMIZER)


def loss_returned(result: Any) -> None:
    """A micro-step's loss returned: a loss that will go backward is hooked to mark the backward's begin and end."""
    loss = result[0] if isinstance(result, tuple) else result
    backward = watched() and isinstance(loss, torch.Tensor) and loss.requires_grad
    if backward:
        loss.register_hook(_backward_begun)
    reached(BEFORE_BACKWARD if backward else AFTER_FORWARD)


def _backward_begun(grad: torch.Tensor) -> None:
    """The backward has begun; its end is queued with the autograd engine (before DDP's wait for its all-reduce)."""
    reached(BACKWARD)
    torch.autograd.Variable._execution_engine.queue_callback(_backward_ended)


def _backward_ended() -> None:
    reached(AFTER_BACKWARD)
