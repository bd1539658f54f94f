"""A ``stage: harc`` run (:class:`HarcRun`): HARC's arguments and phases, in order. Each phase imports its module
lazily (:mod:`llamafactory_hera.recipe.run` says why)."""

from __future__ import annotations

from typing import Any

from typing_extensions import override

from llamafactory_hera.harc.config import HarcArguments, parse_harc_arguments
from llamafactory_hera.recipe.run import MethodRun, RunControls
from llamafactory_hera.runtime.parsed_arguments import HostArguments
from llamafactory_hera.runtime.raw_recipe import RawRecipe


class HarcRun(MethodRun[HarcArguments]):
    """LLaMA-Factory's SFT run with HARC's role data, collator and trainer (docs/harc.md); the end-of-run work ends
    its trainer's ``train``, where the model is at hand."""

    arguments = HarcArguments
    parse = override(staticmethod(parse_harc_arguments))

    @property
    @override
    def controls(self) -> RunControls:
        return RunControls(
            save_signal=self.args.harc_save_on_signal,
            save_signal_key="harc_save_on_signal",
            watched=True,
            watchdog_timeout=self.args.harc_watchdog_timeout,
        )

    @override
    def check_method_raw(self, host_args: RawRecipe) -> None:
        from llamafactory_hera.harc.raw_checks import validate_raw_host_args  # lazy

        validate_raw_host_args(host_args, self.args)

    @override
    def check_parsed(self, parsed: HostArguments) -> None:
        from llamafactory_hera.harc.parsed_checks import validate_host_args  # lazy

        validate_host_args(*parsed, self.args)

    @override
    def prepare(self, host: Any, parsed: HostArguments) -> None:
        from llamafactory_hera.harc.workflow import prepare  # lazy

        prepare(self.args, parsed)

    @override
    def train(self, host: Any, parsed: HostArguments, callbacks: list[Any]) -> None:
        from llamafactory_hera.harc.workflow import train  # lazy

        train(self.args, host, parsed, callbacks)
