"""A method's run: its arguments, controls and phases, all read from its declaration. The declaration is imported at
every LLaMA-Factory start and by one-line errors that load no torch, so each phase imports its module when it runs.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llamafactory_hera.job_refusal import watch
from llamafactory_hera.runtime import save_signal
from llamafactory_hera.runtime.parsed_arguments import HostArguments
from llamafactory_hera.runtime.raw_recipe import RawRecipe

if TYPE_CHECKING:  # the declaration builds its runs: it imports this module
    from llamafactory_hera.recipe.declaration import Method


def declared(path: str) -> Any:
    """A declaration's ``"module:attribute"``, imported now."""
    parts = path.partition(":")
    return getattr(importlib.import_module(parts[0]), parts[2])


@dataclass(frozen=True)
class RunControls:
    """What a whole run obeys beside the method's maths (docs/multinode.md)."""

    save_signal: str | None = None  # sigterm, sigusr1, sigusr2 or none; None: the method saves no checkpoint
    save_signal_key: str | None = None  # its recipe key, for the lines
    watched: bool = False  # a method whose runs take several ranks
    watchdog_timeout: float | None = None  # seconds; None: per section; 0: no watchdog (the ranks still end together)


class MethodRun:
    """One run of a declared method, its phases in the order the stage patch's ``run_method`` lists."""

    def __init__(self, method: Method, args: Any) -> None:
        self.method = method
        self.args = args
        self.prepared: Any = None  # what prepare hands to train and finish
        self.trained: Any = None  # what train hands to finish

    @property
    def stage(self) -> str:
        return self.method.stage

    @property
    def controls(self) -> RunControls:
        """The run-wide controls its keys set."""
        signal_key = self.method.save_signal_key
        timeout_key = self.method.watchdog_key
        return RunControls(
            save_signal=getattr(self.args, signal_key) if signal_key else None,
            save_signal_key=signal_key,
            watched=timeout_key is not None,
            watchdog_timeout=getattr(self.args, timeout_key) if timeout_key else None,
        )

    def noting_save_signal(self) -> contextlib.AbstractContextManager[None]:
        """The save signal noted for the block (the parse, the load, the passes before step 1 and the steps)."""
        return save_signal.noting(self.controls.save_signal, key=self.controls.save_signal_key)

    def watch_refusals(self) -> None:
        """A rank of a method's job ends when another refuses; a thread, once."""
        watch()

    def check_raw(self, host_args: RawRecipe, machine: bool = True) -> None:
        """Phase 1: the launch's checks, the method's own, LLaMA-Factory's keys, the resumed checkpoint;
        ``machine=False`` (``plan``): not this machine's nor the checkpoint's."""
        # lazy (the module doc)
        from llamafactory_hera.recipe.raw_checks import check_raw_launch, check_raw_recipe
        from llamafactory_hera.recipe.resume import check_resume

        check_raw_launch(self.stage, host_args)
        declared(self.method.check_raw)(host_args, self.args)
        check_raw_recipe(host_args, self.stage, machine)
        if machine:
            check_resume(self.stage, host_args)

    def check_parsed(self, parsed: HostArguments) -> None:
        """Phase 2: the method's checks of the parsed arguments."""
        declared(self.method.check_parsed)(*parsed, self.args)

    def in_place_of_sft(self, host: Any, parsed: HostArguments, callbacks: list[Any]) -> None:
        """Phases 3 to 5."""
        method = self.method
        with self._watched(parsed.training):
            if method.prepare:
                self.prepared = declared(method.prepare)(self.args, parsed)
            self.trained = declared(method.train)(self.args, host, parsed, callbacks, self.prepared)
            if method.finish:
                declared(method.finish)(self.args, host, parsed, self.prepared, self.trained)

    @contextlib.contextmanager
    def _watched(self, training_args: Any) -> Iterator[None]:
        if not self.controls.watched:
            yield
            return
        from llamafactory_hera.training import watchdog  # lazy (the module doc)

        with watchdog.watching(training_args, self.controls.watchdog_timeout):
            yield
