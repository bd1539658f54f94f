"""Where a rank is in its run, told to its watchdog by the trainers and workflows: its section and progress.

A section's kind sets its bound and watch (``watch_judge.py``): ``loading``, ``selection``, ``directions``, ``teacher``
(before step 1), ``step``, ``save``, ``final``, ``wait`` (on another rank's work). Progress only grows while the rank
works: forwards begun and done, save stages done. Nothing here writes, syncs or runs a collective.
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
FAILED_IN = "_llamafactory_hera_section"  # set on an error as it leaves its innermost section block


def failed_in(error: BaseException) -> str | None:
    """The section a watched run was in when ``error`` left its innermost section block (None: it left none)."""
    return getattr(error, FAILED_IN, None)


def enter(section: str, kind: str, step: int | None = None) -> None:
    """This rank is now in ``section`` of ``kind`` (``step``: default the current); no-op unwatched."""
    for dog in _running:
        dog.enter(section, kind, step)


def progress(*_: Any) -> None:
    """One unit of progress in the current section; ignores a hook's arguments."""
    for dog in _running:
        dog.progress()


@contextlib.contextmanager
def section(name: str, kind: str | None = None, *, forwards: bool = False) -> Iterator[None]:
    """``name`` (of ``kind``, default ``name``) for the block, then the previous section. ``forwards``: any module's
    forward is progress (a pass whose model the caller does not hold)."""
    before = [(dog, dog.where()) for dog in _running]
    enter(name, kind or name)
    hook = nn_module.register_module_forward_pre_hook(progress) if forwards and _running else None
    try:
        yield
    except BaseException as error:
        # the block's end restores the section before it: the error keeps where it happened, for its line
        if _running and failed_in(error) is None:
            with contextlib.suppress(AttributeError, TypeError):
                setattr(error, FAILED_IN, _running[0].where()[0])
        raise
    finally:
        if hook is not None:
            hook.remove()
        for dog, (previous, previous_kind, step) in before:
            dog.enter(previous, previous_kind, step)


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
