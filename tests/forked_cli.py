"""``llamafactory-cli`` in a process forked from one that has already imported LLaMA-Factory.

A fresh ``llamafactory-cli train`` spends 10-17 s of CPU on this 2-core machine importing torch, transformers,
peft and trl (and, through trl and transformers, wandb and scikit-learn, which the eval extra installs) before it
reads its recipe. The suite runs about a hundred of them. Here a per-worker fork server (``multiprocessing``'s
forkserver) imports ``llamafactory.cli`` and ``llamafactory.train.tuner`` once, through the plugin's start-up hook
as every interpreter of this environment does, and every run is a child forked from it: its own process, ``argv``,
environment, working directory, stdout and stderr (files), exit code and ``atexit`` handlers, running the console
script's entry point (``llamafactory-cli`` = ``llamafactory.cli:main``), so the recipe goes through the real
launcher, parser, trainer and collator. An uncaught error reaches ``sys.excepthook`` as in a fresh process (the
plugin's one-line errors). What the child does not repeat is the interpreter start and the imports.

So a run whose environment could change what happens at start-up or while those modules are imported
(``LLAMAFACTORY_HERA_DISABLE``, ``PYTHONPATH``, ...) runs as a fresh process: only the keys of
:data:`READ_AFTER_IMPORT` may differ from the server's environment. ``HF_HOME`` is one of them although
``huggingface_hub`` and ``datasets`` read it at import: the runs are offline and read local paths, so only the
datasets cache of the tiny json files lands in the server's ``HF_HOME`` (keyed by path and modification time).
Tests of the start itself (activation, import costs, ``--help``) keep spawning fresh interpreters, and torchrun's
ranks are fresh interpreters started by the forked launcher.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

PRELOAD = ["forked_cli_preload"]  # tests/forked_cli_preload.py: what the server imports once
READ_AFTER_IMPORT = {"HF_HOME", "MPLCONFIGDIR", "LLAMAFACTORY_HERA_CACHE", "FORCE_TORCHRUN", "NNODES",
                     "NPROC_PER_NODE", "MASTER_ADDR", "MASTER_PORT", "TMPDIR", "PWD", "OLDPWD",
                     # set by in-process runs of this worker (LLaMA-Factory's run_exp, accelerate), read when parsing
                     "LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"}
_server_env: dict[str, str] | None = None


def _child(argv: list[str], env: dict[str, str], cwd: str, stdout: str, stderr: str) -> None:
    """In the forked child: become ``argv`` run in ``cwd`` with ``env``, then exit as that process would."""
    import atexit
    import faulthandler
    import threading

    for fd, path in ((1, stdout), (2, stderr)):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(handle, fd)
        os.close(handle)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    tempfile.tempdir = None  # read TMPDIR again, as a new process does
    sys.argv = list(argv)
    if env.get("PYTHONFAULTHANDLER"):
        faulthandler.enable()
    code = 0
    try:
        from importlib.metadata import entry_points

        (entry,) = entry_points(group="console_scripts", name=Path(argv[0]).name)
        sys.exit(entry.load()())  # as the console script's wrapper does with main's return value
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - as the interpreter reports an uncaught error: through sys.excepthook
        sys.excepthook(*sys.exc_info())
        code = 1
    try:
        threading._shutdown()  # type: ignore[attr-defined]  # the interpreter joins non-daemon threads first
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _context(base_env: dict[str, str]) -> Any:
    """The forkserver context, its server started with ``base_env`` (once per process)."""
    global _server_env
    context = multiprocessing.get_context("forkserver")
    if _server_env is None:
        from multiprocessing import forkserver

        tests = str(Path(__file__).resolve().parent)
        context.set_forkserver_preload(PRELOAD)
        saved = dict(os.environ)
        os.environ.clear()
        os.environ.update(base_env)
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [tests, base_env.get("PYTHONPATH")]))
        try:
            if tests not in sys.path:
                sys.path.insert(0, tests)
            forkserver.ensure_running()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        _server_env = dict(base_env)
    return context


# Keys that the interpreter, torch, transformers, datasets, huggingface_hub, LLaMA-Factory or the plugin may read at
# start-up or import: a run whose value differs from the server's start gets a fresh interpreter.
IMPORT_TIME_PREFIXES = ("PYTHON", "HF_", "HUGGINGFACE", "TRANSFORMERS", "DATASETS", "TOKENIZERS", "LLAMAFACTORY",
                        "TORCH", "PYTORCH", "OMP_", "MKL_", "KMP_", "CUDA", "NCCL", "XDG_", "HOME", "WANDB",
                        "ACCELERATE", "DISABLE_VERSION_CHECK", "USE_", "MPL", "TMP", "TEMP", "LD_", "GRADIO", "PATH")


def forkable(env: dict[str, str], base_env: dict[str, str]) -> bool:
    """Whether a run with ``env`` may be forked from the server, compared with the environment the server started
    with (``base_env`` before it runs). Keys outside :data:`IMPORT_TIME_PREFIXES` (say ``no_proxy`` or the ranks an
    in-process run of this worker left in ``os.environ``) are read when used, from the child's own environment."""
    base_env = _server_env if _server_env is not None else base_env
    keys = {key for key in set(env) | set(base_env) if key.startswith(IMPORT_TIME_PREFIXES)} - READ_AFTER_IMPORT
    return all(env.get(key) == base_env.get(key) for key in keys)


def run_forked(argv: list[str], env: dict[str, str], cwd: Path, timeout: float,
               base_env: dict[str, str]) -> subprocess.CompletedProcess:
    """``argv`` (a console script of this environment) run as a child of the fork server; the result of
    ``subprocess.run(argv, capture_output=True, text=True)``. ``subprocess.TimeoutExpired`` after ``timeout``."""
    context = _context(base_env)
    with tempfile.TemporaryDirectory(prefix="forked_cli_") as folder:
        out, err = Path(folder) / "stdout", Path(folder) / "stderr"
        process = context.Process(target=_child, args=(list(argv), dict(env), str(cwd), str(out), str(err)))
        process.start()
        process.join(timeout)
        if process.exitcode is None:
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired(argv, timeout, out.read_text(errors="replace"),
                                            err.read_text(errors="replace"))
        return subprocess.CompletedProcess(argv, process.exitcode, out.read_text(errors="replace"),
                                           err.read_text(errors="replace"))
