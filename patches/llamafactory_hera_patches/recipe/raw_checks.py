"""A run's checks before the host parses its recipe (nothing loaded), for the stage patch, the launchers and
``llamafactory-hera plan``: :func:`checked_run` for a method, :func:`check_host_stage` for a host stage. An unknown
stage is refused with the closest name.
"""

from __future__ import annotations

import contextlib
import difflib
import os
from collections.abc import Iterator, Mapping
from typing import Any

from transformers.utils import logging as transformers_logging

from llamafactory_hera.runtime import env_knobs
from llamafactory_hera.runtime.errors import RecipeError
from llamafactory_hera.runtime.raw_recipe import RawRecipe, raw_value, truthy
from llamafactory_hera.runtime.registry import registered_methods

from .. import backends
from ..data.templates import host_stages
from ..engines import fsdp_loading


def checked_run(method: Any, keys: dict[str, Any], host_args: RawRecipe, machine: bool = True) -> Any:
    """``method``'s run of its ``keys``, after the checks before the parse, in order: the plugin's environment
    variables, backend switches (:mod:`..backends`), the keys parsed, the watch that ends this rank when another
    refuses, the run's :meth:`check_raw`. Run in every rank, once in the launcher, and by ``llamafactory-hera plan``
    (``machine`` false: no checks of this machine)."""
    if machine:
        env_knobs.check(os.environ)
    refused = backends.refusal(method.stage, host_args, os.environ if machine else {})
    if refused:
        raise RecipeError(refused)
    run = method.run_of(keys)  # an error names the key
    run.watch_refusals()
    with quiet_transformers():  # may read config.json (HeRA's heads)
        run.check_raw(host_args, machine)
    return run


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' warnings only, for the block: at the host's info level the checks' config and tokenizer reads
    would print 60-250 lines before a one-line refusal."""
    level = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity(max(level, transformers_logging.WARNING))
    try:
        yield
    finally:
        transformers_logging.set_verbosity(level)


def check_host_stage(host_args: RawRecipe, environ: Mapping[str, str]) -> None:
    """A host stage's recipe: the stage exists, and training under ``environ``'s FSDP would not fail after loading
    (an unsaved state dict is warned about by the stage patch, not refused), and the plugin's environment variables
    parse."""
    env_knobs.check(environ)
    check_stage(raw_value(host_args, "stage"), [m.stage for m in registered_methods()], host_stages())
    stage = str(raw_value(host_args, "stage") or "sft")
    refusal = truthy(raw_value(host_args, "do_train")) and fsdp_loading.bitsandbytes_refusal(stage, host_args, environ)
    if refusal:
        raise RecipeError(refusal)


def check_stage(stage: Any, method_stages: list[str], host_stages: tuple[str, ...] | None) -> None:
    """Refuse a ``stage`` neither the plugin's nor the host's (``host_stages`` None: not checked)."""
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
