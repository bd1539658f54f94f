"""``llamafactory-cli train`` under torchrun: the recipe is checked once, in the launcher, before the ranks start
(:func:`check_before_ranks`: a finished run's folder included), one line and exit code 1 as without torchrun. A job
that fails later ends with torchrun's report and its exit code, without the launcher's traceback; one whose ranks
stopped on the save signal ends with 0, the launcher alive through a SIGTERM meanwhile
(:mod:`llamafactory_hera.runtime.launch_signals`). A method declared ``one_process`` (RAH-LoRA) gets a torchrun of
one rank on a multi-GPU node unless ``FORCE_TORCHRUN`` is set. A bare ``torchrun`` has no launcher to patch
(``llamafactory_hera.job_refusal``); ``accelerate launch`` runs :func:`check_before_ranks` too
(:mod:`.accelerate_launch`). A backend switch a plugin stage cannot run under is refused here too (:mod:`.backends`);
LLaMA-Factory's v1 launcher: :mod:`.v1`.

Checked on LLaMA-Factory 0.9.5 and main (the names :func:`apply` requires): ``launcher.launch()`` pops the command
from ``sys.argv`` and runs ``torchrun ... launcher.py <args>`` with ``subprocess.run(check=True)`` when
:func:`starts_torchrun` says so, else ``run_exp()``; the recipe is read as ``hparams.read_args`` reads it
(:func:`.recipe.recipe_file.launch_recipe`).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from types import ModuleType
from typing import Any

import llamafactory.extras.misc as misc

from llamafactory_hera.runtime import launch_signals, launch_watch
from llamafactory_hera.runtime.errors import RecipeError
from llamafactory_hera.runtime.output_dir import refuse_finished
from llamafactory_hera.runtime.raw_recipe import given_keys
from llamafactory_hera.runtime.registry import method_for_stage

from . import backends
from .guard import require
from .recipe.arguments import keys_of, split_args
from .recipe.raw_checks import check_host_stage, start_run
from .recipe.recipe_file import launch_recipe

_MISC_NAMES = ("is_env_enabled", "get_device_count", "use_ray", "use_kt", "check_dependencies", "find_available_port")
_HELP = ("-h", "--help")


def forces_torchrun() -> bool:
    """``FORCE_TORCHRUN``, or a backend switch the launcher starts torchrun under (``USE_MCA``; main's
    ``USE_MEGATRON_BRIDGE``): torchrun whatever the device count."""
    return bool(misc.is_env_enabled("FORCE_TORCHRUN") or backends.forced_torchrun(os.environ))


def starts_torchrun(argv: list[str]) -> bool:
    """Whether ``launch()`` will run ``argv``'s command under torchrun (LLaMA-Factory 0.9.5's own condition)."""
    if len(argv) < 2 or argv[1] != "train":
        return False
    return forces_torchrun() or (misc.get_device_count() > 1 and not misc.use_ray() and not misc.use_kt())


def _import_v0_arguments() -> None:
    """Import v0's arguments (``llamafactory.hparams``) without the version checks its parser runs at import, by the
    name it imports from ``extras.misc``: the ranks run them, as without the plugin."""
    checks = misc.check_dependencies
    misc.check_dependencies = _no_checks
    try:
        import llamafactory.hparams  # noqa: F401 (lazy: its import runs the checks, off here alone)
    finally:
        misc.check_dependencies = checks


def _no_checks() -> None:
    return None


def check_before_ranks(argv: list[str]) -> Any:
    """The checks every rank would run of the recipe before LLaMA-Factory parses it, run once on ``argv``
    (``llamafactory-cli train <recipe> [key=value ...]``): the recipe's method run (None: a host stage) or
    RecipeError."""
    raw = launch_recipe(argv)
    if isinstance(raw, list) and any(flag in raw for flag in _HELP):
        return None
    method = method_for_stage(given_keys(raw).get("stage"))
    # a backend switch first: USE_MCA=1 without mcore_adapter fails v0's llamafactory.hparams at its import
    refused = method is not None and backends.refusal(method.stage, raw, os.environ)
    if refused:
        raise RecipeError(refused)
    try:
        _import_v0_arguments()  # the checks read them
    except ImportError:  # what the switch needs is not installed: a host stage's ranks say so, as without the plugin
        if method is None:
            return None
        raise
    host_args, method_raw, method = split_args(raw)
    refuse_finished(host_args)  # here, not in the ranks: one line, no torchrun report of failed ranks
    if method is None:
        check_host_stage(host_args, os.environ)
        return None
    run = start_run(method, keys_of(method, method_raw)[0], host_args)
    launch_signals.leave_to_ranks(run.controls.save_signal, given_keys(host_args).get("output_dir"))
    return run


def _int_env(name: str, default: int) -> int | None:
    """``name``'s whole number (``default`` when unset), None when it is not one (an elastic range: 1:2)."""
    value = os.environ.get(name) or str(default)
    return int(value) if value.isdigit() else None


def _watched_ranks(run: Any, nodes: int) -> int:
    """How many ranks start a watchdog in this launch: every rank of a method's run unless its recipe turns the
    watchdog off (``<prefix>watchdog_timeout: 0``); none for a host stage or a method of one process."""
    if run is None or run.method.one_process or not run.controls.watched or run.controls.watchdog_timeout == 0:
        return 0
    ranks = nodes * int(os.environ.get("NPROC_PER_NODE") or misc.get_device_count())
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
    """LLaMA-Factory's ``launch()`` (``original``): under torchrun, the recipe checked first, the start watched."""
    if not starts_torchrun(sys.argv):
        return original()
    nodes = _int_env("NNODES", 1)
    # watched from here to the ranks' start (launch_watch), on the port chosen now where LLaMA-Factory would pick
    with launch_watch.watching(misc.find_available_port, nodes, _int_env("NODE_RANK", 0)) as start:
        launch_watch.check_master_address()
        run = check_before_ranks(sys.argv)
        if start is not None:
            start.expect(_watched_ranks(run, nodes or 1))
        if run is not None and run.method.one_process and not forces_torchrun():
            # it places its model over every visible GPU itself: one rank, which sees them all. Not run_exp()
            # here: transformers' arguments in a process that sees several GPUs and no launcher ask for torchrun
            os.environ["FORCE_TORCHRUN"] = "1"
            os.environ["NPROC_PER_NODE"] = "1"
        try:
            with launch_signals.launching():
                return original()
        except subprocess.CalledProcessError as error:  # torchrun's report is above: its exit code, no traceback
            code = 1 if start is not None and start.ended else error.returncode
            raise SystemExit(launch_signals.ended(code)) from None
