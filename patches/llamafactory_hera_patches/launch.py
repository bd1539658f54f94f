"""``llamafactory-cli train`` under torchrun: the recipe is checked once in the launcher before the ranks start
(:func:`check_before_ranks`): one line and exit code 1, as without torchrun. A later failure ends with torchrun's
report and exit code, no launcher traceback; ranks stopped on the save signal end with 0, the launcher surviving a
SIGTERM meanwhile. A ``one_process`` method (RAH-LoRA) gets a one-rank torchrun on a multi-GPU node unless
``FORCE_TORCHRUN`` is set.

Checked on LLaMA-Factory 0.9.5 and main: ``launcher.launch()`` pops the command from ``sys.argv`` and runs ``torchrun
... launcher.py <args>`` with ``subprocess.run(check=True)`` when :func:`starts_torchrun`, else ``run_exp()``.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from types import ModuleType
from typing import Any

import llamafactory.extras.misc as misc

from llamafactory_hera.runtime import agent_notes, elastic, launch_signals, launch_watch
from llamafactory_hera.runtime.errors import RecipeError
from llamafactory_hera.runtime.output_dir import refuse_finished
from llamafactory_hera.runtime.raw_recipe import given_keys
from llamafactory_hera.runtime.registry import method_for_stage

from . import backends
from .guard import require
from .recipe.arguments import keys_of, split_args
from .recipe.raw_checks import check_host_stage, checked_run
from .recipe.recipe_file import launch_recipe

_MISC_NAMES = ("is_env_enabled", "get_device_count", "use_ray", "use_kt", "check_dependencies", "find_available_port")
_HELP = ("-h", "--help")


def forces_torchrun() -> bool:
    """Torchrun whatever the device count: ``FORCE_TORCHRUN``, ``USE_MCA`` or main's ``USE_MEGATRON_BRIDGE``."""
    return bool(misc.is_env_enabled("FORCE_TORCHRUN") or backends.forced_torchrun(os.environ))


def starts_torchrun(argv: list[str]) -> bool:
    """Whether ``launch()`` runs ``argv``'s command under torchrun (the host's own condition)."""
    if len(argv) < 2 or argv[1] != "train":
        return False
    return forces_torchrun() or (misc.get_device_count() > 1 and not misc.use_ray() and not misc.use_kt())


def _import_v0_arguments() -> None:
    """Import ``llamafactory.hparams`` without its import-time version checks (the ranks run them)."""
    checks = misc.check_dependencies
    misc.check_dependencies = _no_checks
    try:
        import llamafactory.hparams  # noqa: F401  # lazy: checks off here
    finally:
        misc.check_dependencies = checks


def _no_checks() -> None:
    return None


def check_before_ranks(argv: list[str]) -> Any:
    """Every rank's pre-parse checks, run once on ``argv`` (``llamafactory-cli train <recipe> [key=value ...]``).
    Returns the method run (None: a host stage); raises RecipeError."""
    raw = launch_recipe(argv)
    if isinstance(raw, list) and any(flag in raw for flag in _HELP):
        return None
    method = method_for_stage(given_keys(raw).get("stage"))
    # backend switch first: USE_MCA=1 without mcore_adapter fails llamafactory.hparams' import
    refused = method is not None and backends.refusal(method.stage, raw, os.environ)
    if refused:
        raise RecipeError(refused)
    try:
        _import_v0_arguments()  # the checks read them
    except ImportError:  # switch's needs missing: a host stage's ranks say so
        if method is None:
            return None
        raise
    host_args, method_raw, method = split_args(raw)
    refuse_finished(host_args)  # here: one line, no torchrun report
    if method is None:
        check_host_stage(host_args, os.environ)
        return None
    run = checked_run(method, keys_of(method, method_raw)[0], host_args)
    launch_signals.leave_to_ranks(run.controls.save_signal, given_keys(host_args).get("output_dir"))
    return run


def _int_env(name: str, default: int) -> int | None:
    """``name``'s whole number (``default`` when unset), None if not one (an elastic range: 1:2)."""
    value = os.environ.get(name) or str(default)
    return int(value) if value.isdigit() else None


def _max_restarts() -> int:
    """The restarts torchrun's agent is given: ``MAX_RESTARTS`` under ``RDZV_ID`` (the launcher's elastic torchrun),
    else none (torchrun's default)."""
    return (_int_env("MAX_RESTARTS", 0) or 0) if os.environ.get("RDZV_ID") is not None else 0


def watched_ranks(run: Any, ranks: int) -> int:
    """Of a launch's ``ranks``, those starting a watchdog: all of a method's run unless ``<prefix>watchdog_timeout:
    0``; none for a host stage or a one-process method."""
    if run is None or run.method.one_process or not run.controls.watched or run.controls.watchdog_timeout == 0:
        return 0
    return ranks if ranks > 1 else 0  # one process: no watchdog


def apply(launcher: ModuleType) -> None:
    """Patch ``llamafactory.launcher`` (all or nothing)."""
    if getattr(launcher, "_llamafactory_hera_patched", False):
        return
    require(launcher, ("launch",), "launch")
    require(misc, _MISC_NAMES, "launch")
    launcher.launch = functools.partial(launch, launcher.launch)
    launcher._llamafactory_hera_patched = True


def launch(original: Any) -> None:
    """The host's ``launch()``; under torchrun, the recipe checked first and the start watched."""
    if not starts_torchrun(sys.argv):
        if misc.use_ray() and sys.argv[1:2] == ["train"]:
            # Ray's workers each run the recipe's checks after Ray started, a refusal wrapped in Ray's traceback:
            # checked here first, it is one line before any worker
            check_before_ranks(sys.argv)
        return original()
    nodes = _int_env("NNODES", 1)
    # watched until the ranks start, on a port chosen now
    with launch_watch.watching(misc.find_available_port, nodes, _int_env("NODE_RANK", 0)) as start:
        launch_watch.check_master_address()
        run = check_before_ranks(sys.argv)
        elastic.store_per_start(run is not None)  # a plugin stage's restarted ranks: not the last start's store
        if start is not None:
            per_node = int(os.environ.get("NPROC_PER_NODE") or misc.get_device_count())
            start.expect(watched_ranks(run, (nodes or 1) * per_node))
        if run is not None and run.method.one_process and not forces_torchrun():
            # one rank spreads the model over every visible GPU. Not run_exp(): transformers' arguments ask for
            # torchrun in a process seeing several GPUs and no launcher
            os.environ["FORCE_TORCHRUN"] = "1"
            os.environ["NPROC_PER_NODE"] = "1"
        try:
            # the ranks' notes folder, made here for the start watch to see a refusal (runtime/agent_notes.py)
            with launch_signals.launching(), agent_notes.taking(_max_restarts()):
                return original()
        except subprocess.CalledProcessError as error:  # torchrun reported: its exit code, no traceback
            code = 1 if start is not None and start.ended else error.returncode
            raise SystemExit(launch_signals.ended(code)) from None
