"""A ``stage: rah`` run (:class:`RahRun`): RAH-LoRA's arguments and phases, in order; its "trainer" is the
calibration (no optimizer step). Each phase imports its module lazily (:mod:`llamafactory_hera.recipe.run` says why)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from typing_extensions import override

from llamafactory_hera.rah.config import RahArguments, parse_rah_arguments
from llamafactory_hera.recipe.run import MethodRun
from llamafactory_hera.runtime.parsed_arguments import HostArguments
from llamafactory_hera.runtime.raw_recipe import RawRecipe

if TYPE_CHECKING:
    from llamafactory_hera.rah.workflow import RahCalibrated, RahPreparation


class RahRun(MethodRun[RahArguments]):
    """Calibrates the recipe's model on its image-text rows into a LoRA adapter (docs/rah.md). One process: no save
    signal, no watchdog."""

    arguments = RahArguments
    parse = override(staticmethod(parse_rah_arguments))
    prepared: RahPreparation | None = None  # the rows, read before the model loads
    calibrated: RahCalibrated | None = None  # the calibration, for the finish to write

    @override
    def check_method_raw(self, host_args: RawRecipe) -> None:
        from llamafactory_hera.rah.raw_checks import validate_raw_host_args  # lazy

        validate_raw_host_args(host_args, self.args)

    @override
    def check_parsed(self, parsed: HostArguments) -> None:
        from llamafactory_hera.rah.parsed_checks import validate_host_args  # lazy

        validate_host_args(*parsed, self.args)

    @override
    def prepare(self, host: Any, parsed: HostArguments) -> None:
        from llamafactory_hera.rah.workflow import prepare  # lazy

        self.prepared = prepare(self.args, parsed)

    @override
    def train(self, host: Any, parsed: HostArguments, callbacks: list[Any]) -> None:
        from llamafactory_hera.rah.workflow import calibrate_model  # lazy

        self.calibrated = calibrate_model(self.args, parsed, self.prepared)

    @override
    def finish(self, host: Any, parsed: HostArguments) -> None:
        from llamafactory_hera.rah.workflow import finish  # lazy

        finish(self.args, parsed, self.prepared, self.calibrated)
