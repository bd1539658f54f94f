"""Where a rank is in its run, told to its watchdog by the trainers and workflows: its section and progress.

A section's kind sets its bound and watch (``watch_judge.py``): ``loading``, ``selection``, ``directions``, ``teacher``
(before step 1), ``step``, ``save``, ``final``, ``wait`` (on another rank's work). Progress only grows while the rank
works: forwards begun and done, save stages done, and the files of a folder being written growing (:func:`writing`,
measured by ``watch_growth.py``). Nothing here writes, syncs or runs a collective.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch.nn.modules import module as nn_module


class Watched(Protocol):
    """What a running watchdog takes from the run."""

    def enter(self, section: str, kind: str, step: int | None = None) -> None: ...

    def progress(self) -> None: ...

    def where(self) -> tuple[str, str, int]: ...


_running: list[Watched] = []  # this process's watchdog (none or one)
_writing: list[str] = []  # the folders being written, innermost last: their files growing is progress


def enter(section: str, kind: str, step: int | None = None) -> None:
    """This rank is now in ``section`` of ``kind`` (``step``: default the current); no-op unwatched."""
    for dog in _running:
        dog.enter(section, kind, step)


def progress(*_: Any) -> None:
    """One unit of progress in the current section; ignores a hook's arguments."""
    for dog in _running:
        dog.progress()


@contextlib.contextmanager
def section(name: str, kind: str | None = None, *, forwards: bool = False, files: str | None = None) -> Iterator[None]:
    """``name`` (of ``kind``, default ``name``) for the block, then the previous section. ``forwards``: any module's
    forward is progress (a pass whose model the caller does not hold); ``files``: a folder the block writes."""
    before = [(dog, dog.where()) for dog in _running]
    enter(name, kind or name)
    try:
        with contextlib.ExitStack() as counted:
            if forwards:
                counted.enter_context(counting_every_forward())
            counted.enter_context(writing(files))
            yield
    finally:
        for dog, (previous, previous_kind, step) in before:
            dog.enter(previous, previous_kind, step)


@contextlib.contextmanager
def counting_every_forward() -> Iterator[None]:
    """Every module's forward in the block is progress, in the current section (``generate`` runs the model inside
    its own call, under no hook on the model)."""
    hook = nn_module.register_module_forward_pre_hook(progress) if _running else None
    try:
        yield
    finally:
        if hook is not None:
            hook.remove()


@contextlib.contextmanager
def writing(folder: str | None) -> Iterator[None]:
    """``folder``'s files growing (or going) is progress in the block: a save's checkpoint folder, a download's cache
    folder, a rotation's run folder (None: none)."""
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
    """Each forward of ``model`` counts twice, as it begins and returns: a rank stuck in its forward stays behind the
    ranks waiting in a collective."""
    handles = [model.register_forward_pre_hook(progress), model.register_forward_hook(progress)] if _running else []
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
