"""``accelerate launch`` of the host's training (``-m llamafactory.launcher``, ``launcher.py``, ``src/train.py``,
``llamafactory-cli train``): :func:`.launch.check_before_ranks` runs in the launcher with the ranks' environment, so a
refused recipe is one line and no rank starts; then a multi-GPU launch's start is watched as torchrun's (DeepSpeed's
launcher and an elastic rendezvous have their store elsewhere: unwatched).

Checked on accelerate 1.11 (on another shape the ranks check the recipe themselves): ``accelerate.commands.launch``
calls the :data:`_PREPARES` globals (``args``: command merged with config) just before starting the ranks; each
returns their environment.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from llamafactory_hera.runtime import job_store, launch_watch
from llamafactory_hera.runtime.errors import RecipeError

_PREPARES = ("prepare_multi_gpu_env", "prepare_deepspeed_cmd_env", "prepare_simple_launcher_cmd_env")
_CLIS = ("llamafactory-cli", "lmf")


def training_argv(args: Any) -> list[str] | None:
    """``llamafactory-cli train <recipe> ...`` for a launch of the host's training, else None."""
    script = str(args.training_script)
    rest = [str(arg) for arg in args.training_script_args]
    if getattr(args, "module", False):
        return ["llamafactory-cli", "train", *rest] if script == "llamafactory.launcher" else None
    if Path(script).name in _CLIS:
        return ["llamafactory-cli", *rest] if rest[:1] == ["train"] else None
    return ["llamafactory-cli", "train", *rest]


def _check_cli_form(args: Any) -> None:
    """Refuse ``llamafactory-cli train`` under ``accelerate launch``: a bare name is no file python can run; with
    several devices (or ``FORCE_TORCHRUN``) the CLI starts a nested torchrun in every rank on accelerate's port."""
    script = str(args.training_script)
    if Path(script).name not in _CLIS or getattr(args, "module", False):
        return
    if not Path(script).is_file() and not getattr(args, "no_python", False):
        raise RecipeError(
            f"accelerate launch ... {script} train: accelerate runs its training script with python and "
            f"there is no file {script} in {Path.cwd()}; launch `-m llamafactory.launcher RECIPE.yaml` "
            f"instead, or run `{script} train RECIPE.yaml` without accelerate launch."
        )
    import llamafactory.extras.misc as misc  # lazy: other scripts load no host

    devices = misc.get_device_count()
    if devices > 1 or misc.is_env_enabled("FORCE_TORCHRUN"):
        raise RecipeError(
            f"accelerate launch ... {script} train: with {devices} visible devices "
            "LLaMA-Factory's CLI starts a torchrun of its own inside every rank; launch "
            "`-m llamafactory.launcher RECIPE.yaml` (or LLaMA-Factory's src/train.py) instead."
        )


@contextlib.contextmanager
def _environ(environ: Mapping[str, str]) -> Iterator[None]:
    """``os.environ`` is only ``environ`` for the block."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def checked(prepare: Callable[[Any], Any], args: Any) -> Any:
    """accelerate's ``prepare``, then, for the host's training, the recipe checked in the ranks' environment."""
    result = prepare(args)
    argv = training_argv(args)
    if argv is not None:
        from .launch import check_before_ranks  # lazy: other scripts load no host

        environ = result[1] if isinstance(result, tuple) else result
        with _environ(environ):
            _check_cli_form(args)
            run = check_before_ranks(argv)
        if getattr(prepare, "__name__", "") == "prepare_multi_gpu_env":
            watch_start(args, run, environ)
    return result


def watch_start(args: Any, run: Any, environ: Mapping[str, str]) -> launch_watch.StartWatch | None:
    """The launch's start watched until every rank's watchdog runs (the thread ends itself); None where the store is
    not torchrun's static one (``rdzv_backend`` other than static, or ``standalone``)."""
    from .launch import watched_ranks  # lazy: other scripts load no host

    # standalone: accelerate's own store on a port of its choosing (29500 was taken), which the watch cannot know
    if str(getattr(args, "rdzv_backend", None) or "static") != "static" or getattr(args, "standalone", False):
        return None
    address = (str(getattr(args, "main_process_ip", None) or "127.0.0.1"), int(args.main_process_port))
    nodes = int(getattr(args, "num_machines", None) or 1)
    node = int(getattr(args, "machine_rank", None) or 0)
    watch = launch_watch.StartWatch(address, node, nodes, job_store.start_bound(environ), launch_watch.end_launch)
    watch.expect(watched_ranks(run, int(getattr(args, "num_processes", None) or 1)))
    watch.thread.start()
    return watch


def apply(launch: ModuleType) -> None:
    """Patch ``accelerate.commands.launch`` (all or nothing; on another shape, nothing)."""
    if getattr(launch, "_llamafactory_hera_patched", False) or not all(hasattr(launch, n) for n in _PREPARES):
        return
    for name in _PREPARES:
        setattr(launch, name, functools.partial(checked, getattr(launch, name)))
    launch._llamafactory_hera_patched = True
