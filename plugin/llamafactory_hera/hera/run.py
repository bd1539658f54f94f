"""A ``stage: hera`` run (:class:`HeraRun`): its arguments and phases in order, each importing its module lazily
(:mod:`llamafactory_hera.recipe.run` says why)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from typing_extensions import override

from llamafactory_hera.hera.config import HeraArguments, parse_hera_arguments
from llamafactory_hera.recipe.run import MethodRun, RunControls
from llamafactory_hera.runtime.parsed_arguments import HostArguments
from llamafactory_hera.runtime.raw_recipe import RawRecipe

if TYPE_CHECKING:
    from llamafactory_hera.hera.workflow import HeraPreparation


class HeraRun(MethodRun[HeraArguments]):
    """LLaMA-Factory's SFT run with HeRA's collator and trainer (docs/hera.md)."""

    arguments = HeraArguments
    parse = override(staticmethod(parse_hera_arguments))
    prepared: HeraPreparation | None = None

    @property
    @override
    def controls(self) -> RunControls:
        return RunControls(
            save_signal=self.args.hera_save_on_signal,
            save_signal_key="hera_save_on_signal",
            watched=True,
            watchdog_timeout=self.args.hera_watchdog_timeout,
        )

    @override
    def check_method_raw(self, host_args: RawRecipe) -> None:
        from llamafactory_hera.hera.raw_checks import validate_raw_host_args  # lazy

        validate_raw_host_args(host_args, self.args)

    @override
    def check_parsed(self, parsed: HostArguments) -> None:
        from llamafactory_hera.hera.parsed_checks import validate_host_args  # lazy

        validate_host_args(*parsed, self.args)

    @override
    def prepare(self, host: Any, parsed: HostArguments) -> None:
        from llamafactory_hera.hera.workflow import prepare  # lazy

        self.prepared = prepare(self.args, parsed)

    @override
    def train(self, host: Any, parsed: HostArguments, callbacks: list[Any]) -> None:
        from llamafactory_hera.hera.workflow import train  # lazy

        train(self.args, host, parsed, callbacks, self.prepared)

    @override
    def finish(self, host: Any, parsed: HostArguments) -> None:
        from llamafactory_hera.hera.workflow import finish  # lazy

        finish(host, parsed)
