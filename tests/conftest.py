"""Shared fixtures: tiny offline assets (built once per session), training runs (`run_train`: in-process `run_exp` or
a real `llamafactory-cli` process) and the `llamafactory-hera` verbs in-process (`run_verb`)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import io
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TextIO

import pytest
import yaml
from cost_record import pytest_runtest_protocol  # noqa: F401 - hook
from frozen_heap import pytest_collection_finish, pytest_runtest_logfinish  # noqa: F401 - hooks
from slow_first import pytest_collection_modifyitems as put_slow_modules_first
from warm_launch import ENGINES, close_warm_servers

from llamafactory_hera._bootstrap import register_methods
from llamafactory_hera.fixtures import TinyAssets, build_tiny_assets
from llamafactory_hera_patches.stacks import family_too_new, installed
from llamafactory_hera_testing.recipes import base_recipe, harc_recipe  # noqa: F401 - the tests import them from here

register_methods()  # what the start-up hook does before a patch runs: tests call the patches without LLaMA-Factory

REPO = Path(__file__).resolve().parents[1]

# In-process runs (run_exp) read these at import time of huggingface_hub / transformers.
for _key, _value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                     "DISABLE_VERSION_CHECK": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_DISABLED": "true"}.items():
    os.environ.setdefault(_key, _value)
CLI = str(Path(sys.executable).with_name("llamafactory-cli"))
PROCESS_HOOKS = REPO / "tests" / "process_hooks"  # the start-up hook of the processes tests start
# sys.stdout / sys.stderr of this pytest session (its own capture's while it captures), which the host's logging
# handlers made outside a capturing fixture keep (see :func:`captured`), and those made inside one from the end of its
# test on (see :func:`_release_test_streams`)
SESSION_STREAMS = (sys.stdout, sys.stderr)
# run_verb's stdout and stderr: text streams writing to descriptors 1 and 2, wherever they point when written; never
# closed, since a library may keep the stream it found (lmms-eval's loguru sink keeps sys.stderr)
DESCRIPTOR_STREAMS = tuple(open(fd, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
                           for fd in (1, 2))

RUN_ENV = "HERA_TESTS_RUN"  # names this pytest run in the environment of every process it starts
if not os.environ.get("PYTEST_XDIST_WORKER"):  # the run's controller (or a run without workers); workers inherit it
    os.environ[RUN_ENV] = f"{os.getpid()}-{time.time_ns()}"
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # share the cores between pytest-xdist workers, not oversubscribe
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


EVAL_ONLY = ("wandb", "sklearn", "scikit-learn", "nltk")  # the eval extra's, which no training run imports to use


def offline_env(tmp: Path, eval_extra: bool = False, engines: tuple[str, ...] = (), **extra: str) -> dict[str, str]:
    """Environment for a subprocess that must never touch the network. The process does not see the packages it does
    not use (tests/process_hooks/unused_packages.py, last on ``PYTHONPATH``): the eval extra's :data:`EVAL_ONLY` unless
    ``eval_extra``, and the :data:`ENGINES` not in ``engines`` (see :func:`engines_of`): an install without them, and
    about 4 CPU s less of imports per training process."""
    env = {k: v for k, v in os.environ.items()  # HERA_TEST_COSTS: a pytest it starts records nothing of its tests
           if not k.startswith(("LLAMAFACTORY_HERA_", "FORCE_TORCHRUN", "PYTEST_XDIST_", "HERA_TEST_COSTS"))}
    env.update({
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp / "hf_home"), "MPLCONFIGDIR": str(tmp / "mpl"), "DISABLE_VERSION_CHECK": "1",
        "TOKENIZERS_PARALLELISM": "false", "WANDB_DISABLED": "true", "CUDA_VISIBLE_DEVICES": "",
        "LLAMAFACTORY_HERA_CACHE": str(tmp / "hera_cache"),  # selections and teacher features: never the user's
        "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1",  # a crash prints every Python thread's stack
        # the launcher calls `torchrun` by name: use the one of this interpreter's environment
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "HERA_TESTS_HIDDEN": ",".join([*(() if eval_extra else EVAL_ONLY),
                                       *(name for name in ENGINES if name not in engines)]),
    })
    env.update(extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(PROCESS_HOOKS)]))
    return env


def engines_of(recipe: dict[str, Any]) -> tuple[str, ...]:
    """The :data:`ENGINES` a run of ``recipe`` uses: DeepSpeed for a ``deepspeed`` config, bitsandbytes for
    ``quantization_bit`` or a checkpoint saved quantized (``quantization_config`` in its config.json)."""
    config = Path(str(recipe.get("model_name_or_path", ""))) / "config.json"
    quantized = recipe.get("quantization_bit") is not None or (
        config.is_file() and "quantization_config" in json.loads(config.read_text(encoding="utf-8")))
    return (*(("deepspeed",) if recipe.get("deepspeed") else ()), *(("bitsandbytes",) if quantized else ()))


def saved_in_bf16(model: str | Path, folder: Path) -> Path:
    """A copy of the tiny model at ``model`` whose config says bfloat16, as Hub checkpoints do: LLaMA-Factory loads it
    in bf16 (``torch_dtype: auto``), where the fp32 original with ``bf16: true`` gets fp32 weights under autocast.
    The key is the installed transformers' own (``dtype`` from 4.56, ``torch_dtype`` before)."""
    shutil.copytree(model, folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    key = "dtype" if "dtype" in config else "torch_dtype"
    (folder / "config.json").write_text(json.dumps({**config, key: "bfloat16"}), encoding="utf-8")
    return folder


@pytest.fixture
def repacking_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every bitsandbytes 4-bit layer made in this test repacks its weight for the CPU inference kernel at an
    eval-mode forward on an input without gradient, as on a CPU with AVX512-BF16 (training/eval_forward.py): an eval
    forward of a model that does not keep its layout fails the test on any CPU, not only on such a one."""
    pytest.importorskip("bitsandbytes")
    monkeypatch.setattr("bitsandbytes.nn.modules.has_avx512bf16", lambda: True)


@pytest.fixture(autouse=True)
def _own_hera_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test its own ``$LLAMAFACTORY_HERA_CACHE`` (selections, teacher features): none sees another's rows, and
    none writes to the user's ``~/.cache``. A test may set its own."""
    monkeypatch.setenv("LLAMAFACTORY_HERA_CACHE", str(tmp_path_factory.mktemp("hera_cache")))


@pytest.fixture(autouse=True)
def _excepthook_unwrapped() -> Iterator[None]:
    """torch's ``init_process_group`` wraps ``sys.excepthook`` for good, adding ``[rankN]: `` to every line: an
    in-process group of one test (tests/test_cost_count.py's fake one, a one-rank gloo group) would prefix the next
    in-process run's one-line error in the same worker. Unwrapped after each test (the plugin's own hook, installed
    when a test first imports the host's trainer, stays)."""
    yield
    while getattr(sys.excepthook, "__name__", "") == "_distributed_excepthook":
        sys.excepthook = inspect.getclosurevars(sys.excepthook).nonlocals["old_hook"]


@pytest.fixture(scope="session")
def assets() -> TinyAssets:
    """Tiny Qwen3-VL / Qwen2.5-VL / LLaVA, DINOv2 teacher and image–caption data (cached under .hera_assets/); a
    family the installed transformers lacks (Qwen3-VL before 4.57.1) is not built, and a test asking for it skips."""
    built = build_tiny_assets(REPO / ".hera_assets" / "tests", seed=0)
    return dataclasses.replace(built, models=_Families(built.models), templates=_Families(built.templates))


class _Families(dict):
    """A family -> value dict whose missing family skips the test when the installed transformers lacks it."""

    def __missing__(self, key: str) -> Any:
        needed = family_too_new(key)
        if needed:
            pytest.skip(f"{key} needs transformers >= {needed}, found {installed()}")
        raise KeyError(key)


@pytest.fixture(scope="session")
def harc_assets() -> Any:
    """Tiny Llama-3 / Qwen2 text LLMs and HARC's role datasets (cached under .hera_assets/harc)."""
    from llamafactory_hera.fixtures.harc_assets import build_harc_assets

    return build_harc_assets(REPO / ".hera_assets" / "harc", seed=0)


@pytest.fixture(scope="session")
def trained_harc_run(harc_assets: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-step HARC run of the tiny Llama-3 (2 held-out rows per role, no end-of-run eval), trained once per session
    for the eval tests (copy it before writing into it)."""
    from test_eval_cli import train

    output = tmp_path_factory.mktemp("harc_run") / "harc"
    train(harc_recipe(harc_assets, "llama3", output, harc_eval=False, max_steps=3, harc_validate_samples=2))
    return output


@pytest.fixture(scope="session")
def zoo() -> Callable[[str], Path]:
    """A zoo family's tiny model folder (llamafactory_hera_testing/zoo.py), built on first use and kept under
    .hera_assets/zoo/ per transformers version: one build of a family serves every module, session and pytest-xdist
    worker (the build is renamed into place whole)."""
    from llamafactory_hera_testing.zoo import zoo_model  # imports transformers: not at the import of every test module

    return functools.partial(zoo_model, root=REPO / ".hera_assets" / "zoo" / f"transformers-{installed()}")


@pytest.fixture(scope="module")
def tiny_llama3(harc_assets: Any) -> Any:
    """The tiny Llama-3 as an engine: model, tokenizer, LLaMA-Factory's llama3 template."""
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = harc_assets.models["llama3"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    template = get_template_and_fix_tokenizer(tokenizer, DataArguments(template="llama3"))
    return SimpleNamespace(model=AutoModelForCausalLM.from_pretrained(folder).eval(), tokenizer=tokenizer,
                           template=template)


@pytest.fixture
def accelerator(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A simulated accelerator (llamafactory_hera_testing/accelerator.py), the host stack patched to place work on it.

    ``with accelerator: run_exp(recipe, callbacks=[StepSyncs(accelerator)])`` runs a real training on it.
    """
    with simulated_accelerator(monkeypatch) as simulated:
        yield simulated


@contextlib.contextmanager
def simulated_accelerator(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The :func:`accelerator` fixture's device for the block, patched in with ``monkeypatch`` (undone at its end): a
    fixture of wider scope passes its own ``pytest.MonkeyPatch.context()``."""
    from llamafactory_hera_testing.accelerator import SimulatedAccelerator
    from llamafactory_hera_testing.accelerator_run import patch_for_simulated_device, reset_accelerate_state

    reset_accelerate_state()
    simulated = SimulatedAccelerator()
    patch_for_simulated_device(monkeypatch, simulated)
    try:
        yield simulated
    finally:
        monkeypatch.undo()
        reset_accelerate_state()  # a later in-process run in this worker must set up the CPU again


# A run whose environment sets one of these is a real process: ranks, or what the start-up hook reads.
PROCESS_ENV = ("FORCE_TORCHRUN", "LLAMAFACTORY_HERA_DISABLE", "LLAMAFACTORY_HERA_TRACEBACK", "PYTHONPATH")


def run_train(recipe: dict[str, Any], tmp: Path, *cli_overrides: str, check: bool = True,
              env: dict[str, str] | None = None, process: bool = False,
              timeout: int = 600, eval_extra: bool = False) -> subprocess.CompletedProcess:
    """Train on ``recipe`` (``key=value`` overrides as on the command line); exit code, stdout and stderr come back.

    In this process through LLaMA-Factory's ``run_exp`` (what ``llamafactory-cli train`` calls; see
    :func:`run_in_process`), with ``env`` set and cwd ``tmp`` for the run. A real ``llamafactory-cli train`` process
    where the process is what is tested: ``process=True`` or ``env`` naming a key of :data:`PROCESS_ENV` (torchrun
    ranks, what the start-up hook reads). ``check``: a failed run raises AssertionError. ``eval_extra``: the process
    sees the eval extra (see :func:`offline_env`; the engines it sees are the recipe's, :func:`engines_of`).
    """
    recipe = {**recipe, **{k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in cli_overrides)}}
    tmp.mkdir(parents=True, exist_ok=True)
    if not process and not set(env or {}) & set(PROCESS_ENV):
        proc = run_in_process(recipe, tmp, env or {})
        if check and proc.returncode != 0:
            raise AssertionError(f"run_exp failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
        return proc
    path = tmp / "recipe.yaml"

    def fresh() -> None:  # also after emptying an output_dir that holds the run's folder
        tmp.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")

    fresh()
    proc = run_once_more_if_aborted_at_exit(
        [CLI, "train", str(path)],
        dict(cwd=tmp, env=offline_env(tmp, eval_extra, engines_of(recipe), **(env or {})), timeout=timeout),
        lambda: (shutil.rmtree(recipe.get("output_dir", tmp / "__none__"), ignore_errors=True), fresh()))
    if check and proc.returncode != 0:
        raise AssertionError(
            f"llamafactory-cli failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


@contextlib.contextmanager
def isolated_run(cwd: Path, env: dict[str, str]) -> Iterator[None]:
    """An in-process run with ``env`` added and ``cwd`` as folder; afterwards os.environ, the folder and accelerate's
    process-wide state are as before (run_exp sets the ranks' variables and the state's device)."""
    from llamafactory_hera_testing.accelerator_run import reset_accelerate_state

    reset_accelerate_state()
    try:
        with environment(cwd, env):
            yield
    finally:
        reset_accelerate_state()


@contextlib.contextmanager
def environment(cwd: Path, env: dict[str, str]) -> Iterator[None]:
    """``env`` added and ``cwd`` as folder for the block; afterwards os.environ (with what the block set: the ranks'
    variables of run_exp, eval's LLAMAFACTORY_VERBOSITY) and the folder are as before."""
    saved, folder = dict(os.environ), os.getcwd()
    os.environ.update(env)
    os.chdir(cwd)
    try:
        yield
    finally:
        os.chdir(folder)
        os.environ.clear()
        os.environ.update(saved)


def run_in_process(recipe: dict[str, Any], tmp: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """``run_exp(recipe)`` in this process (see :func:`isolated_run`), reported as its console script's process would
    be: what it printed, logged and warned (once per place) as stdout and stderr; an uncaught error through
    ``sys.excepthook`` (the plugin's short errors) and exit code 1, a ``SystemExit`` its code."""
    from llamafactory.train.tuner import run_exp

    out, err = io.StringIO(), io.StringIO()
    with isolated_run(tmp, env), captured(out, err):
        code = exit_code_of(run_exp, recipe)
    return subprocess.CompletedProcess(["run_exp"], code, out.getvalue(), err.getvalue())


def run_verb(capfd: pytest.CaptureFixture[str], *argv: str | Path, cwd: Path | None = None,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``llamafactory-hera ARGV`` in this process (``cli.main(argv)``, what its console script calls), reported as the
    script's process would be (see :func:`run_in_process`), with ``env`` set and cwd ``cwd`` (if given) for the run.

    stdout and stderr are read at file descriptors 1 and 2 (``capfd``): while a command loads through the host it
    points them at a log file (log.py's host_output_to), so for the run ``sys.stdout`` / ``sys.stderr`` and the logging
    handlers write to the descriptors, as in a process, and transformers logs at the WARNING level a process starts
    with (an earlier in-process run leaves the INFO of LLaMA-Factory's parser). A real process only where the process
    is what is tested: the console script's exit code and one-line error, a fresh interpreter's imports, its exit."""
    from llamafactory_hera.cli import main

    capfd.readouterr()  # what the test printed before: not the command's
    out, err = DESCRIPTOR_STREAMS
    transformers_level = logging.getLogger("transformers").level
    logging.getLogger("transformers").setLevel(logging.WARNING)
    try:
        with environment(cwd or Path.cwd(), env or {}), captured(out, err):
            code = exit_code_of(main, [str(arg) for arg in argv])
    finally:
        logging.getLogger("transformers").setLevel(transformers_level)
        out.flush()
        err.flush()
    printed = capfd.readouterr()
    return subprocess.CompletedProcess(["llamafactory-hera", *map(str, argv)], code, printed.out, printed.err)


def exit_code_of(entry: Callable[[Any], Any], argument: Any) -> int:
    """The exit code of a process whose console script runs ``sys.exit(entry(argument))``: a ``SystemExit``'s code; an
    uncaught error goes through ``sys.excepthook`` (the plugin's short errors) and exits 1."""
    try:
        result = entry(argument)
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
    except Exception as error:  # noqa: BLE001 - reported as the interpreter reports an uncaught error
        sys.excepthook(type(error), error, error.__traceback__)
        return 1
    return result if isinstance(result, int) else 0


@contextlib.contextmanager
def captured(out: TextIO, err: TextIO) -> Iterator[None]:
    """``sys.stdout`` / ``sys.stderr``, ``warnings`` (shown once per place, as by a process) and every logging handler
    writing to either (LLaMA-Factory's and transformers' handlers keep the stream they were made with: the session's
    or the current one) go to ``out`` / ``err``; afterwards those handlers write where they did, and handlers made
    meanwhile to the session's streams."""
    streams = {id(stream): new for stream, new in ((sys.stdout, out), (sys.stderr, err), (SESSION_STREAMS[0], out),
                                                   (SESSION_STREAMS[1], err))}
    swapped = {handler: handler.stream for handler in _stream_handlers() if id(handler.stream) in streams}
    for handler in swapped:
        handler.setStream(streams[id(handler.stream)])
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: \
                sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))
            yield
    finally:
        back = {id(out): SESSION_STREAMS[0], id(err): SESSION_STREAMS[1]}
        for handler in _stream_handlers():
            if handler in swapped:
                handler.setStream(swapped[handler])
            elif id(handler.stream) in back:
                handler.setStream(back[id(handler.stream)])


@pytest.hookimpl(wrapper=True, trylast=True)
def _releasing_test_streams(item: pytest.Item) -> Iterator[None]:
    try:
        return (yield)
    finally:
        _release_test_streams()


# the same wrapper ends the setup and the call phase (pluggy matches a hook by the module attribute's name)
pytest_runtest_setup = pytest_runtest_call = _releasing_test_streams


def _release_test_streams() -> None:
    """Logging handlers writing to this test's ``capfd`` / ``capsys`` streams write to the session's afterwards.

    A library configures its handler once per process with the ``sys.stdout`` / ``sys.stderr`` of that moment:
    LLaMA-Factory's ``StreamHandler(sys.stdout)`` at its first import, transformers' ``StreamHandler()`` with ``flush``
    bound to that ``sys.stderr``'s. Made while a test's ``capfd`` captures (a test body or fixture that imports the
    library first), the handler would keep the fixture's file, closed when the test ends, and a later test's record
    would print "--- Logging error ---" (``ValueError: I/O operation on closed file``). Runs innermost of the phase's
    hook wrappers (``trylast``), while the capture fixture's streams are still ``sys.stdout`` / ``sys.stderr``."""
    moved = [(test, session) for test, session in zip((sys.stdout, sys.stderr), SESSION_STREAMS, strict=True)
             if test is not session]
    for handler in _stream_handlers():
        for test_stream, session_stream in moved:
            if getattr(handler.__dict__.get("flush"), "__self__", None) is test_stream:
                handler.flush = session_stream.flush  # before setStream, which flushes
            if handler.stream is test_stream:
                handler.setStream(session_stream)


def _stream_handlers() -> set[logging.StreamHandler]:
    """Every plain ``StreamHandler`` of a logger (not pytest's capturing handlers, not file handlers)."""
    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]
    return {handler for lg in loggers for handler in lg.handlers if type(handler) is logging.StreamHandler}


def aborted_at_exit(proc: subprocess.CompletedProcess) -> bool:
    """A torchrun run that completed training and failed only because a rank aborted in C++ while its process
    exited: torchrun's report names SIGABRT (exit -6) as the root cause and no rank exited with a Python error
    (every exit code it lists is -6, or -15 for the ranks torchrun then stopped)."""
    codes = [int(code) for code in re.findall(r"exitcode\s*:\s*(-?\d+)", proc.stderr)]
    return (proc.returncode != 0 and "terminate called without an active exception" in proc.stderr
            and "Signal 6 (SIGABRT)" in proc.stderr
            and any(done in proc.stdout + proc.stderr for done in ("Training completed", "***** train metrics *****"))
            and bool(codes) and set(codes) <= {-6, -15})


def run_once_more_if_aborted_at_exit(command: list[str], options: dict[str, Any],
                                     clean: Callable[[], None], tries: int = 3) -> subprocess.CompletedProcess:
    """Run a multi-process command; run it again (after ``clean()``), up to ``tries`` runs in all, while it only
    :func:`aborted_at_exit`.

    On 2026-11-23 one rank of a completed two-rank gloo run on CPU aborted while exiting in 3 of 4 CI runs (each
    time another test: auto heads, DDP equivalence, ZeRO-3), never in 31 runs outside CI. faulthandler
    (PYTHONFAULTHANDLER=1 in offline_env) showed the main thread with no Python frame: the abort comes after
    all Python code, in interpreter finalization. The warning quotes the stderr.
    """
    proc = run_process(command, **options)
    for _ in range(tries - 1):
        if not aborted_at_exit(proc):
            break
        warnings.warn("a rank aborted at exit after training completed; ran again:\n" + proc.stderr[-6000:],
                      stacklevel=3)
        clean()
        proc = run_process(command, **options)
    return proc


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now: for a test's launcher (torch's and accelerate's default, 29500, is shared by
    every launch the parallel workers run at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


LAUNCH_ENV = "HERA_TESTS_LAUNCH"  # names one launch of run_process in the environment of every process it starts
ORPHAN_GRACE_S = 30  # a launcher waits for its ranks: one still running this long after it exited is orphaned


def run_process(command: list[str], *, cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """``subprocess.run(command, capture_output=True, text=True, ...)``; on timeout, or when processes the command
    started still run :data:`ORPHAN_GRACE_S` after it exited, everything it started is killed and the test fails
    with the output so far. ``subprocess.run`` kills only the child, and killing its process group is not enough:
    torchrun (torch 2.11's elastic agent) starts each rank in a session of its own, and a rank that outlived its
    launcher kept the output pipes open, so the test waited on them until the rank's gloo timeout (seen 2026-11-27:
    a two-rank test hung 15 minutes). Each process of the launch carries :data:`LAUNCH_ENV`."""
    import psutil

    launch = f"{os.getpid()}-{time.time_ns()}"
    deadline = time.monotonic() + timeout
    exited_at = None  # when the command itself ended while its output pipes stayed open
    with subprocess.Popen(command, cwd=cwd, env={**env, LAUNCH_ENV: launch}, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True) as process:
        while True:
            try:  # in slices: a retried communicate loses no output
                # 1-s slices: the command's exit is seen within a second, so an orphan fails ORPHAN_GRACE_S after it
                stdout, stderr = process.communicate(timeout=max(0.1, min(1.0, deadline - time.monotonic())))
                break
            except subprocess.TimeoutExpired:
                if process.poll() is not None and exited_at is None:
                    exited_at = time.monotonic()
                orphaned = exited_at is not None and time.monotonic() - exited_at > ORPHAN_GRACE_S
                if not orphaned and time.monotonic() < deadline:
                    continue
            if exited_at is None:  # not reaped yet: its pid, the group's id, cannot be another launch's
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
            for _ in range(3):  # again: a marked process may have started another meanwhile
                marked = [other for other in processes_marked(LAUNCH_ENV, launch) if other.pid != process.pid]
                for other in marked:
                    with contextlib.suppress(psutil.Error):
                        other.kill()
                still_running(marked, timeout=10)  # ended before the test goes on
            try:
                stdout, stderr = process.communicate(timeout=30)
            except subprocess.TimeoutExpired as held:  # something unmarked still holds the pipes: what came so far
                stdout, stderr = (part.decode(errors="replace") if isinstance(part, bytes) else part or ""
                                  for part in (held.output, held.stderr))
            why = (f"exited (code {process.returncode}) but what it started still ran {ORPHAN_GRACE_S} s later"
                   if orphaned else f"timed out after {timeout:.0f} s")
            raise AssertionError(f"{' '.join(command)[:300]} {why}; everything it started was killed:\n"
                                 f"{stdout[-3000:]}\n{stderr[-6000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def still_running(processes: list[Any], timeout: float) -> list[Any]:
    """Waits up to ``timeout`` s for each of ``processes`` to end; returns those still running. A zombie has ended:
    its pipes are closed, and reaping it is up to its new parent (here one took ~2 s, which psutil.wait_procs waited
    out)."""
    import psutil

    deadline = time.monotonic() + timeout
    while True:
        running = []
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                if process.status() != psutil.STATUS_ZOMBIE:
                    running.append(process)
        if not running or time.monotonic() >= deadline:
            return running
        time.sleep(0.05)


def processes_marked(key: str, value: str) -> list[Any]:
    """The live processes with ``key=value`` in their environment, other than pytest's own and Python's
    multiprocessing resource tracker."""
    import psutil

    own = {os.getpid(), *(parent.pid for parent in psutil.Process().parents())}
    marked = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        try:
            if process.pid not in own and process.environ().get(key) == value and not any(
                    "multiprocessing.resource_tracker" in part for part in process.info["cmdline"] or []):
                marked.append(process)
        except (psutil.Error, OSError):  # gone meanwhile, or not ours to read
            continue
    return marked


def leftover_processes() -> list[Any]:
    """Processes of this run (:data:`RUN_ENV` in their environment) still alive, other than pytest's own."""
    return processes_marked(RUN_ENV, os.environ[RUN_ENV])


@pytest.hookimpl(hookwrapper=True)
def pytest_sessionfinish(session: pytest.Session) -> Iterator[None]:
    """The run ends everything it started: a process still alive at the end (a web UI, a rank, a server) is
    killed and fails the run (checked once, by the controller after xdist has stopped its workers); each process
    first ends its warm processes (tests/warm_launch.py)."""
    close_warm_servers()
    yield
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    import psutil

    left = leftover_processes()
    _, alive = psutil.wait_procs(left, timeout=10)  # give processes that are exiting the time to
    if not alive:
        return
    names = "\n".join(f"  {p.pid}: {' '.join(p.info['cmdline'] or [])[:200]}" for p in alive)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    sys.stderr.write(f"\nthe test run left {len(alive)} process(es) running; killed:\n{names}\n")
    if session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def image_less_dataset(assets: TinyAssets, folder: Path) -> Path:
    """A copy of the tiny dataset folder whose 32 rows keep their text but lose every image (and <image> tag)."""
    shutil.copytree(assets.dataset_dir, folder)
    rows = json.loads((folder / "hera_demo.json").read_text())
    for row in rows:
        row["images"] = []
        row["messages"][0]["content"] = row["messages"][0]["content"].replace("<image>", "")
    (folder / "hera_demo.json").write_text(json.dumps(rows))
    return folder


def gqa_llava(assets: TinyAssets, folder: Path) -> Path:
    """The tiny LLaVA (``llava`` template: no BOS) with a GQA text model: its 4 query heads share 2 KV heads, so
    heads 0-1 and 2-3 read the same ``v_proj`` rows. Same tokenizer and processor, weights drawn under seed 0."""
    import torch
    from transformers import AutoConfig, LlavaForConditionalGeneration

    if (folder / "model.safetensors").is_file():
        return folder
    shutil.copytree(assets.models["llava"], folder)
    config = AutoConfig.from_pretrained(folder)
    config.text_config.num_key_value_heads = 2
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlavaForConditionalGeneration(config).save_pretrained(folder)
    return folder


MIXED_SIZES = {1: (96, 48), 3: (96, 96), 5: (48, 96), 7: (96, 96)}  # row % 8 -> (width, height); others 48 x 48


def mixed_size_dataset(assets: TinyAssets, folder: Path) -> Path:
    """A copy of the tiny dataset folder whose rows have images of 4 sizes (:data:`MIXED_SIZES`): under Qwen's
    dynamic resolution 2x2, 3x3, 2x3 and 3x2 merged patches (16, 8, 4 and 4 of the 32 rows)."""
    from PIL import Image

    shutil.copytree(assets.dataset_dir, folder)
    rows = json.loads((folder / "hera_demo.json").read_text())
    for index, row in enumerate(rows):
        size = MIXED_SIZES.get(index % 8)
        if size is None:
            continue
        name = f"images/row{index}_{size[0]}x{size[1]}.png"
        Image.open(folder / row["images"][0]).convert("RGB").resize(size).save(folder / name)
        row["images"] = [name]
    (folder / "hera_demo.json").write_text(json.dumps(rows))
    return folder


def read_trainer_log(output_dir: Path) -> list[dict[str, Any]]:
    """Lines of LLaMA-Factory's trainer_log.jsonl (what LlamaBoard plots)."""
    path = output_dir / "trainer_log.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_log_history(output_dir: Path) -> list[dict[str, Any]]:
    """trainer_state.json's log_history."""
    return json.loads((output_dir / "trainer_state.json").read_text(encoding="utf-8"))["log_history"]


def refuse_loading(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """LLaMA-Factory's loaders ``names`` (``load_model``, ``load_tokenizer``) fail the test when called: a refusal must
    come before them (RAH loads through the offline tools' loader, which calls the same functions)."""
    import llamafactory.model as model  # here: importing llamafactory costs seconds, and only these tests need it
    import llamafactory.train.sft.workflow as workflow

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model was loaded before the error")

    for module in (workflow, model):
        for name in names:
            monkeypatch.setattr(module, name, refuse)


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a model or tokenizer fails the test: every refusal it guards comes before."""
    refuse_loading(monkeypatch, "load_model", "load_tokenizer")


class FirstGradients:
    """A ``TrainerCallback``: every trainable parameter's gradient before the first optimizer step, by name."""

    def __init__(self) -> None:
        self.grads: dict[str, Any] = {}

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if not self.grads:
            self.grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()
                          if p.requires_grad and p.grad is not None}

    def __getattr__(self, name: str) -> Any:  # every other callback event: nothing
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The slowest modules first under xdist (tests/slow_first.py); a test of a model family (a ``name`` parameter:
    tests/test_families.py, the zoo's SFT controls) whose transformers class the installed release lacks is skipped,
    naming the release it needs (docs/families.md)."""
    put_slow_modules_first(config, items)
    for item in items:
        name = getattr(getattr(item, "callspec", None), "params", {}).get("name")
        needed = family_too_new(name) if isinstance(name, str) else None
        if needed:
            item.add_marker(pytest.mark.skip(reason=f"{name} needs transformers >= {needed}, found {installed()}"))
