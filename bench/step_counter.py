"""Counting one optimizer step of a real ``run_exp`` on the host, for bench/step_counts.py: the aten ops dispatched
(a ``TorchDispatchMode``) and the Python calls made (``sys.setprofile``), in all, in ``torch/utils/checkpoint.py``,
inside named sections of the code, and with ``by_op`` by op name and by Python function."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

_SECTION: list[str] = []  # the named section the counted code is in (innermost last)


@dataclass
class Counts:
    ops: int = 0
    calls: int = 0
    checkpoint_calls: int = 0
    sections: dict[str, int] = field(default_factory=dict)  # aten ops inside each named section
    section_calls: dict[str, int] = field(default_factory=dict)  # Python calls inside each named section
    section_checkpoint_calls: dict[str, int] = field(default_factory=dict)  # of them in checkpoint.py
    by_op: dict[str, int] = field(default_factory=dict)  # aten ops by name (with --by-op)
    by_function: dict[str, int] = field(default_factory=dict)  # Python calls by file:function (with --by-op)


@contextlib.contextmanager
def section(name: str) -> Iterator[None]:
    """Ops counted inside go to ``name`` too."""
    _SECTION.append(name)
    try:
        yield
    finally:
        _SECTION.pop()


def in_section(name: str, function: Callable[..., Any], context: bool = False) -> Callable[..., Any]:
    """``function`` counting its ops (a context manager's: those of its body) into ``name``."""
    if context:
        @contextlib.contextmanager
        def managed(*args: Any, **kwargs: Any) -> Iterator[Any]:
            with section(name), function(*args, **kwargs) as value:
                yield value
        return managed

    def counted(*args: Any, **kwargs: Any) -> Any:
        with section(name):
            return function(*args, **kwargs)
    return counted


def step_counter(step: int, by_op: bool = False, whole: bool = False, calls: bool = True) -> Any:
    """A ``TrainerCallback`` that counts optimizer step ``step`` (0-based) into its ``counts`` (``by_op``: by op
    name and by Python function too; ``whole``: the host's whole step, see ``StepCounter``; ``calls``: with ``whole``,
    count the Python calls too, in the next step)."""
    import sys as _sys

    import torch.utils.checkpoint as checkpoint_module
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import TrainerCallback

    checkpoint_file = checkpoint_module.__file__
    counts = Counts()
    depth = [0]  # inside the counting mode: the op's own Python frames are the counter's, not the step's

    class OpCount(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            counts.ops += 1
            if by_op:
                name = str(func)
                counts.by_op[name] = counts.by_op.get(name, 0) + 1
            if _SECTION:
                counts.sections[_SECTION[-1]] = counts.sections.get(_SECTION[-1], 0) + 1
            depth[0] += 1
            try:
                return func(*args, **(kwargs or {}))
            finally:
                depth[0] -= 1

    dispatch_code = OpCount.__torch_dispatch__.__code__

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event != "call" or depth[0] or frame.f_code is dispatch_code:
            return
        counts.calls += 1
        if by_op:
            code = frame.f_code
            where = f"{code.co_filename.split('site-packages/')[-1]}:{code.co_name}"
            counts.by_function[where] = counts.by_function.get(where, 0) + 1
        if _SECTION:
            counts.section_calls[_SECTION[-1]] = counts.section_calls.get(_SECTION[-1], 0) + 1
        if frame.f_code.co_filename == checkpoint_file:
            counts.checkpoint_calls += 1
            if _SECTION:
                counts.section_checkpoint_calls[_SECTION[-1]] = counts.section_checkpoint_calls.get(_SECTION[-1], 0) + 1

    class StepCounter(TrainerCallback):
        """Counts ``step`` from its on_step_begin to its on_step_end, ops and calls together; with ``whole``, the
        host's whole step, from the previous step's on_step_end (its batch fetched and collated, then the step):
        aten ops in step ``step``, Python calls in step ``step + 1``, since a dispatch mode's own machinery makes
        Python calls for every op it sees (some 8 an op: counted together, they would count the ops twice)."""

        def __init__(self) -> None:
            self.counts, self.mode = counts, None
            self.profiling = False

        def _start(self, ops: bool, calls: bool) -> None:
            if ops:
                self.mode = OpCount()
                self.mode.__enter__()
            if calls:
                self.profiling = True
                _sys.setprofile(profile)

        def _stop(self) -> None:
            if self.profiling:
                _sys.setprofile(None)
                self.profiling = False
            if self.mode is not None:
                self.mode.__exit__(None, None, None)
                self.mode = None

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if not whole and state.global_step == step:
                self._start(ops=True, calls=True)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._stop()  # global_step is now the number of steps done: step `step` is done at step + 1
            if whole and state.global_step in (step, step + 1):
                self._start(ops=state.global_step == step, calls=calls and state.global_step == step + 1)

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._stop()

    return StepCounter()
