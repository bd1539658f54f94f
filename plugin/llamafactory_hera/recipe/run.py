"""A method's run (:class:`MethodRun`): its arguments and its phases, in the order the stage patch runs them
(docs/development.md, "Architecture").

A run class is light to import: the declaration that names it (:mod:`llamafactory_hera.methods`) is imported at every
start of LLaMA-Factory and by ``llamafactory-hera``'s one-line errors, which load no torch. So each phase imports the
module that does its work when it runs; that is why every ``# lazy`` import of a run class is lazy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from llamafactory_hera.job_refusal import watch
from llamafactory_hera.runtime.raw_recipe import RawRecipe
from llamafactory_hera.runtime.stage_run import HostArguments, RunControls

Arguments = TypeVar("Arguments")


class Declared(Protocol):
    """What a run reads of the declaration that names its class (``recipe.declaration.Method``, which imports this
    module: a protocol here, so that the two do not import each other)."""

    @property
    def stage(self) -> str: ...

    @property
    def one_process(self) -> bool: ...


class MethodRun(Generic[Arguments]):
    """One run of a method: a subclass per method, which its declaration names.

    The stage patch parses the method's keys (:meth:`parse`, into :attr:`arguments`), then runs the phases in order:

    1. :meth:`check_raw`: before LLaMA-Factory parses the recipe, nothing loaded (also before torchrun starts ranks);
    2. :meth:`check_parsed`: after its parse, before any model or dataset loads;
    3. :meth:`prepare`: what runs before step 1 outside the trainer (head selection, the data's checks);
    4. :meth:`train`: LLaMA-Factory's SFT workflow with the method's collator and trainer (``host``: what the stage
       patch offers of it, ``llamafactory_hera_patches.stage.SFTWorkflow``);
    5. :meth:`finish`: what follows the steps (plots).

    3 to 5 run in place of LLaMA-Factory's ``run_sft`` (:meth:`run`), watched across the ranks where :attr:`controls`
    says so.
    """

    arguments: ClassVar[type]  # the dataclass of the method's recipe keys

    def __init__(self, method: Declared, args: Arguments) -> None:
        self.method = method
        self.args = args

    @property
    def stage(self) -> str:
        """The recipe's ``stage:`` value that selects the method."""
        return self.method.stage

    @staticmethod
    def parse(keys: dict[str, Any]) -> Any:
        """The method's arguments from its prefixed recipe keys (values possibly strings); errors name the key."""
        raise NotImplementedError

    @property
    def controls(self) -> RunControls:
        """The run-wide controls its keys set: none unless the method has them."""
        return RunControls()

    def check_raw(self, host_args: RawRecipe, machine: bool = True) -> None:
        """Phase 1: the launch's checks every method runs (precision, DeepSpeed path, FSDP, streaming), the method's
        own (:meth:`check_method_raw`), then the checks every method runs of the keys LLaMA-Factory reads and of the
        checkpoint it resumes from; ``machine=False`` (``llamafactory-hera plan``): not this machine's, nor the
        checkpoint's."""
        # lazy (the module doc)
        from llamafactory_hera.recipe.raw_checks import check_raw_launch, check_raw_recipe
        from llamafactory_hera.recipe.resume import check_resume

        watch()  # a rank of a method's job ends when another refuses (a stock stage's rank is left as stock runs)
        check_raw_launch(self.stage, host_args)
        self.check_method_raw(host_args)
        check_raw_recipe(host_args, self.stage, machine)
        if machine:
            check_resume(self.stage, host_args)

    def check_method_raw(self, host_args: RawRecipe) -> None:
        """The method's own checks of the raw recipe (its keys are :attr:`args`)."""

    def check_parsed(self, parsed: HostArguments) -> None:
        """Phase 2: the method's checks of LLaMA-Factory's parsed arguments."""

    def run(self, host: Any, parsed: HostArguments, callbacks: list[Any]) -> None:
        """Phases 3 to 5, in place of ``run_sft``."""
        with self._watched(parsed.training):
            self.prepare(host, parsed)
            self.train(host, parsed, callbacks)
            self.finish(host, parsed)

    def prepare(self, host: Any, parsed: HostArguments) -> None:
        """Phase 3: what runs before step 1 outside the trainer."""

    def train(self, host: Any, parsed: HostArguments, callbacks: list[Any]) -> None:
        """Phase 4: the method's steps."""
        raise NotImplementedError

    def finish(self, host: Any, parsed: HostArguments) -> None:
        """Phase 5: what follows the steps."""

    @contextlib.contextmanager
    def _watched(self, training_args: Any) -> Iterator[None]:
        """The ranks watched for the block, with the run's timeout, where the method's runs take several ranks."""
        if not self.controls.watched:
            yield
            return
        from llamafactory_hera.training import watchdog  # lazy (the module doc)

        with watchdog.watching(training_args, self.controls.watchdog_timeout):
            yield
