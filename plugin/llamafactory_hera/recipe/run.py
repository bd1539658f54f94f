"""A method's run (:class:`MethodRun`): arguments and phases (docs/development.md, "Architecture"). Its declaration is
imported at every LLaMA-Factory start and by one-line errors that load no torch, so each phase imports its working
module when it runs (every ``# lazy`` import here).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from llamafactory_hera.job_refusal import watch
from llamafactory_hera.runtime import save_signal
from llamafactory_hera.runtime.parsed_arguments import HostArguments
from llamafactory_hera.runtime.raw_recipe import RawRecipe

Arguments = TypeVar("Arguments")


@dataclass(frozen=True)
class RunControls:
    """What a whole run obeys beside the method's maths (docs/multinode.md): the save signal (noted by
    :meth:`MethodRun.noting_save_signal`; left to the ranks by the launcher) and the watchdog (:meth:`MethodRun.run`).
    """

    save_signal: str | None = None  # sigterm, sigusr1, sigusr2 or none; None: the method saves no checkpoint
    save_signal_key: str | None = None  # its recipe key, for the lines
    watched: bool = False  # a method whose runs take several ranks
    watchdog_timeout: float | None = None  # seconds; None: per section; 0: no watchdog (the ranks still end together)


class Declared(Protocol):
    """What a run reads of ``recipe.declaration.Method`` (a protocol: that module imports this one)."""

    @property
    def stage(self) -> str: ...

    @property
    def one_process(self) -> bool: ...


class MethodRun(Generic[Arguments]):
    """One run of a method (a subclass per method). The stage patch parses the keys (:meth:`parse`), then runs:

    1. :meth:`check_raw`: before LLaMA-Factory's parse, nothing loaded (also before torchrun starts ranks);
    2. :meth:`check_parsed`: after the parse, before any model or dataset loads;
    3. :meth:`prepare`: before step 1, outside the trainer (head selection, data checks);
    4. :meth:`train`: LLaMA-Factory's SFT workflow (``host``: ``llamafactory_hera_patches.stage.SFTWorkflow``) with
       the method's collator and trainer;
    5. :meth:`finish`: after the steps (plots).

    3 to 5 replace ``run_sft`` (:meth:`run`), watched across ranks where :attr:`controls` says so.
    """

    arguments: ClassVar[type]  # the dataclass of the method's recipe keys

    def __init__(self, method: Declared, args: Arguments) -> None:
        self.method = method
        self.args = args

    @property
    def stage(self) -> str:
        """The method's ``stage:`` value."""
        return self.method.stage

    @staticmethod
    def parse(keys: dict[str, Any]) -> Any:
        """The arguments from the prefixed keys (values may be strings); errors name the key."""
        raise NotImplementedError

    @property
    def controls(self) -> RunControls:
        """The run-wide controls its keys set (default none)."""
        return RunControls()

    def noting_save_signal(self) -> contextlib.AbstractContextManager[None]:
        """The save signal noted for the block (the stage patch's: the parse, the load, the passes before step 1 and
        the steps), for the trainer's checkpoints (``training/checkpoints.py``) to save and stop on."""
        return save_signal.noting(self.controls.save_signal, key=self.controls.save_signal_key)

    def check_raw(self, host_args: RawRecipe, machine: bool = True) -> None:
        """Phase 1: the launch's checks, :meth:`check_method_raw`, LLaMA-Factory's keys, the resumed checkpoint;
        ``machine=False`` (``plan``): not this machine's nor the checkpoint's."""
        # lazy (the module doc)
        from llamafactory_hera.recipe.raw_checks import check_raw_launch, check_raw_recipe
        from llamafactory_hera.recipe.resume import check_resume

        watch()  # a rank of a method's job ends when another refuses (stock stages left as they run)
        check_raw_launch(self.stage, host_args)
        self.check_method_raw(host_args)
        check_raw_recipe(host_args, self.stage, machine)
        if machine:
            check_resume(self.stage, host_args)

    def check_method_raw(self, host_args: RawRecipe) -> None:
        """The method's checks of the raw recipe (its keys: :attr:`args`)."""

    def check_parsed(self, parsed: HostArguments) -> None:
        """Phase 2: the method's checks of the parsed arguments."""

    def run(self, host: Any, parsed: HostArguments, callbacks: list[Any]) -> None:
        """Phases 3 to 5."""
        with self._watched(parsed.training):
            self.prepare(host, parsed)
            self.train(host, parsed, callbacks)
            self.finish(host, parsed)

    def prepare(self, host: Any, parsed: HostArguments) -> None:
        """Phase 3."""

    def train(self, host: Any, parsed: HostArguments, callbacks: list[Any]) -> None:
        """Phase 4."""
        raise NotImplementedError

    def finish(self, host: Any, parsed: HostArguments) -> None:
        """Phase 5."""

    @contextlib.contextmanager
    def _watched(self, training_args: Any) -> Iterator[None]:
        """Ranks watched with the run's timeout, for a method with several ranks."""
        if not self.controls.watched:
            yield
            return
        from llamafactory_hera.training import watchdog  # lazy (the module doc)

        with watchdog.watching(training_args, self.controls.watchdog_timeout):
            yield
