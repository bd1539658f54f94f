"""A run's checks before LLaMA-Factory parses its recipe (nothing loaded), as the stage patch, the launchers
(:mod:`..launch`, :mod:`..accelerate_launch`) and ``llamafactory-hera plan`` run them: a method's run started from its
keys (:func:`start_run`), or a host stage's recipe checked (:func:`check_host_stage`). A stage that is neither a
method's nor the host's (``FinetuningArguments.stage``'s ``Literal``) is refused with the closest name.
"""

from __future__ import annotations

import contextlib
import difflib
import os
from collections.abc import Iterator, Mapping
from typing import Any

from transformers.utils import logging as transformers_logging

from llamafactory_hera.runtime.errors import RecipeError
from llamafactory_hera.runtime.raw_recipe import RawRecipe, raw_value, truthy
from llamafactory_hera.runtime.registry import registered_methods

from .. import backends
from ..data.templates import host_stages
from ..engines import fsdp_loading


def start_run(method: Any, keys: dict[str, Any], host_args: RawRecipe, machine: bool = True) -> Any:
    """``method``'s run (its declaration's run class) from its own ``keys``, after its raw checks: a backend switch
    that hands the run to another workflow (:mod:`..backends`) first, then the run's :meth:`check_raw`. Run in every
    rank, once before torchrun or ``accelerate launch`` starts the ranks, and by ``llamafactory-hera plan`` without
    this ``machine``'s checks."""
    refused = backends.refusal(method.stage, host_args, os.environ if machine else {})
    if refused:
        raise RecipeError(refused)
    run = method.run(method, method.run.parse(keys))  # the method's keys parsed: an error names the key
    with quiet_transformers():  # a raw check may read the model's config.json (HeRA's heads)
        run.check_raw(host_args, machine)
    return run


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' warnings only, for the block: LLaMA-Factory's parse turns its info logging on, and the checks'
    reads of the model's config and tokenizer would print every file read and the whole config (60-250 lines) before
    a one-line refusal; the model load that follows a passed check prints them as in an SFT run."""
    level = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity(max(level, transformers_logging.WARNING))
    try:
        yield
    finally:
        transformers_logging.set_verbosity(level)


def check_host_stage(host_args: RawRecipe, environ: Mapping[str, str]) -> None:
    """A recipe of no method's stage: the stage is LLaMA-Factory's, and a training run under the FSDP ``environ`` names
    (what ``accelerate launch`` sets) would not fail after loading (a state dict that saves no adapter is said, not
    refused: the stage patch)."""
    check_stage(raw_value(host_args, "stage"), [m.stage for m in registered_methods()], host_stages())
    stage = str(raw_value(host_args, "stage") or "sft")
    refusal = truthy(raw_value(host_args, "do_train")) and fsdp_loading.bitsandbytes_refusal(stage, host_args, environ)
    if refusal:
        raise RecipeError(refusal)


def check_stage(stage: Any, method_stages: list[str], host_stages: tuple[str, ...] | None) -> None:
    """A recipe's ``stage`` is the plugin's or LLaMA-Factory's (``host_stages``; None: not known, not checked)."""
    if stage is None or host_stages is None:
        return
    value = str(stage).strip().lower()
    if value in method_stages or value in host_stages:
        return
    close = difflib.get_close_matches(value, [*method_stages, *host_stages], n=1, cutoff=0.5)
    hint = f"did you mean {close[0]}? " if close else ""
    raise RecipeError(
        f"stage: {stage} is not a stage; {hint}stages: {', '.join(method_stages)} (llamafactory-hera), "
        f"{', '.join(host_stages)} (LLaMA-Factory)."
    )
