#!/usr/bin/env python3
"""Developer entry point for a fresh clone; needs only a Python >= 3.11 (standard library).

    python3 dev.py test [PYTEST ARGS...]   set up .venv, then ruff + pytest (offline)
    python3 dev.py demo [DEMO ARGS...]     set up .venv, then python -m llamafactory_hera.demo
    ... --stack oldest                     the same on the second stack (.venv-oldest, constraints-oldest.txt):
                                           test runs the three demos and OLDEST_STACK_TESTS there
    ... --stack main                       the same on LLaMA-Factory main (.venv-main, constraints-main.txt) at the
                                           commit of TESTED_MAIN, from LLAMAFACTORY_MAIN_SOURCE (a source archive
                                           with its COMMIT, that archive unpacked, a git URL or a clone; default:
                                           the pinned, else newest, ../shared/llamafactory-main/*.tar.gz): test
                                           runs the three demos and MAIN_STACK_TESTS there
    python3 dev.py test --stack all        the stacks one after another (what CI runs), main's source checked first
    python3 dev.py pin-main [REF]          pin main as LLAMAFACTORY_MAIN_SOURCE holds it (a git source: at REF,
                                           default its HEAD)
    python3 dev.py costs [PYTEST ARGS...]  test (pinned stack), each test's cost recorded; then tests/COSTS.md
    python3 dev.py costs --from DIR        tests/COSTS.md from a recording made before (HERA_TEST_COSTS=DIR)

Set-up (every run, each phase timed): create ``.venv`` in the repository root if it is missing
(reused otherwise), install uv into it (``UV``; pip's settings handed over, pip alone where uv cannot be given one
of them or cannot be installed; each install that uv fails is done again with pip), install the torch trio pinned
by ``constraints-torch.txt``, install this package NON-editable (so the ``.pth`` start-up hook is installed exactly
as users get it): ``test`` with its test extras (``-c constraints-torch.txt ".[test]"``: pytest, ruff, deepspeed,
playwright, ...), ``demo`` without them (``"."``: what a user installs); then force-reinstall the
package alone so the venv always holds the current tree; ``test`` then (re)installs the tests' and bench's support
code, ``testing/`` (``llamafactory_hera_testing``: the simulated accelerator, small recipes), which users do not get.
A ``.venv`` made by ``demo`` gets the test extras on the first ``test``; one made by ``test`` runs the demo as it is.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import venv
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
CONSTRAINTS = ROOT / "constraints-torch.txt"
# the host stacks (docs/install.md's table): each in its own venv, pinned by its own constraints file. "pinned" runs the
# whole suite (lint included); "oldest" (LLaMA-Factory 0.9.5 with the oldest transformers it allows that the plugin
# supports) runs the three demos and OLDEST_STACK_TESTS; "all" (what CI runs) both, one after the other
STACKS = {
    "pinned": (".venv", "constraints-torch.txt"),
    "oldest": (".venv-oldest", "constraints-oldest.txt"),
    "main": (".venv-main", "constraints-main.txt"),
}
# LLaMA-Factory main is on no package index: "main" installs it from LLAMAFACTORY_MAIN_SOURCE (a source archive of it
# with its COMMIT, that archive unpacked, a git URL or a clone), by default from the archive at the pin in SHARED_MAIN
# (the shared folder beside the repository, which CI's clone has too), at the commit TESTED_MAIN pins (which the
# plugin's version guard names too); `dev.py pin-main` moves the pin
MAIN_SOURCE_ENV = "LLAMAFACTORY_MAIN_SOURCE"
MAIN_SOURCE_FIX = (f"set {MAIN_SOURCE_ENV} to a source archive of LLaMA-Factory main with its COMMIT file (as in "
                   "../shared/llamafactory-main/), that archive unpacked, or a git URL or clone of LLaMA-Factory")
SHARED_MAIN = ROOT.parent / "shared" / "llamafactory-main"
SOURCE_COMMIT = "COMMIT"  # the file at the top of a source archive of main that names its commit
TESTED_MAIN = ROOT / "patches" / "llamafactory_hera_patches" / "tested_main.json"
MAIN_VERSION_FILE = "src/llamafactory/extras/env.py"  # VERSION = "..." in LLaMA-Factory's tree
# on the second stack: each method's stage, select, the families that release has, resume, the host-key refusals
OLDEST_STACK_TESTS = (
    "tests/test_stacks.py",  # the transformers range, the families a release lacks, fa2 on 5.6.0
    "tests/test_host_key_refusals.py",
    "tests/test_resume_checks.py",
    "tests/hera/test_hera_train_inprocess.py",  # stage: hera (qwen2_5_vl, llava; qwen3_vl where the release has it)
    "tests/rah/test_rah_stage.py",
    "tests/harc/test_harc_stage.py",
    "tests/hera/test_hera_selection.py",  # select
)
# on main: the oldest stack's subset, then the tests of every patch point (the trainer's entry, both launchers and v1's
# parse, accelerate's launch and FSDP utilities, the templates, LlamaBoard) and of main's own switches and families
MAIN_STACK_TESTS = (
    *OLDEST_STACK_TESTS,
    "tests/test_backend_switches.py",  # every backend switch x stage, main's Megatron-Bridge included
    "tests/test_host_guard.py",  # the pinned commit is what is installed
    "tests/test_activation.py",
    "tests/test_host_only.py",  # v1 (USE_V1, a stock v1 run), accelerate launch of a user's script
    "tests/test_torchrun_refusals.py",
    "tests/test_launch_refusals.py",
    "tests/test_accelerate_refusals.py",
    "tests/test_fsdp_adapter_patch.py",
    "tests/test_fsdp_qlora_patch.py",
    "tests/hera/test_hera_llava15_recipes.py",  # the LLaVA-1.5 templates
    "tests/hera/test_hera_webui.py",  # LlamaBoard: stage list, panels, saved config, loss plot
    "tests/rah/test_rah_webui.py",
    "tests/harc/test_harc_webui.py",
    "tests/test_output_dir.py",  # LlamaBoard's own files in output_dir (main's webui_subprocess.log)
)
# tests of OLDEST_STACK_TESTS that fail on the second stack for a known open bug, deselected there by name so that
# they are seen (none open: hera_heads: auto under torchrun, "SafetensorError: device cpu:0 is invalid" on 4.55, was
# fixed 2026-11-26)
OLDEST_STACK_OPEN: tuple[str, ...] = ()
# multi-process engine runs (FSDP2 through accelerate launch) are the pinned stack's: the second stack's subset reaches
# each stage on one process (DeepSpeed is not installed there, so its two-rank test skips by itself)
OLDEST_STACK_ENGINE_RUNS = ("tests/harc/test_harc_stage.py::test_fsdp2_gives_the_losses_of_one_process",
                            "tests/harc/test_harc_stage.py::test_fsdp2_with_qlora_gives_the_losses_of_one_process")
# left out on main, to fit its part of CI's 25 minutes on 2 cores (the pinned stack about 20, the oldest stack's part
# 1.5; main's part took 306 CPU s with it, 253 without, 2026-11-29): select's two-rank run (39 CPU s, the subset's
# longest test), whose collectives are the plugin's own; main's launcher and stage patch points are run by
# test_torchrun_refusals.py and the stages' tests, and the pinned and oldest stacks run it
MAIN_STACK_LEFT_OUT = ("tests/hera/test_hera_selection.py::test_auto_heads_under_torchrun_are_chosen_once_and_shared",)
DEMO_METHODS = ("hera", "rah", "harc")
# the second stack's demos on two streams at once: each demo is mostly one process's imports, one core's work, so two
# run beside each other on CI's two cores; RAH-LoRA after HeRA, whose tiny models it reuses (built once)
DEMO_STREAMS = (("hera", "rah"), ("harc",))
SECOND_STACK_DEMO_STEPS = 3  # the demos' whole path (assets, run, summary, plots) in fewer steps: CI's 25 minutes
TORCH_TRIO = ("torch", "torchvision", "torchaudio")
# the installer of every set-up step after itself: on a 2-core machine uv installed the pinned stack (6.4 GB, CUDA
# wheels included) in 60 s with an empty cache and 19 s with a full one, pip in 169 s (2026-11-26)
UV = "uv==0.13.9"
LINT_PATHS = ("plugin", "patches", "testing", "tests", "bench", "dev.py")
FORMAT_PATHS = ("plugin", "patches")  # `ruff format plugin patches` writes them so
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "DISABLE_VERSION_CHECK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
USAGE = __doc__.split("\n\n")[1]
# what each command installs of this package (pip requirement, from the repository root)
INSTALL_TARGETS = {"test": ".[test]", "demo": "."}
PYTEST_NO_TESTS = 5

_timings: list[tuple[str, float]] = []
# CI runs in a fresh clone that is deleted afterwards: each run under CI appends its timings and the machine's load
# here, so the next developer on the same machine can compare CI's wall time with an idle run's
CI_TIMINGS_LOG = Path.home() / ".cache" / "llamafactory-hera" / "ci-timings.log"


def log(message: str) -> None:
    """Print a dev.py line (flushed, so it interleaves correctly with child output)."""
    print(f"[dev.py] {message}", flush=True)


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Time one phase and report it."""
    log(f"--> {name}")
    start = time.perf_counter()
    try:
        yield
    finally:
        elapsed = time.perf_counter() - start
        _timings.append((name, elapsed))
        log(f"<-- {name}: {elapsed:.1f}s")


def run(cmd: Sequence[str | Path], env: dict[str, str] | None = None, check: bool = True) -> int:
    """Run a command from the repository root, echoing it; raise SystemExit on failure if ``check``."""
    args = [str(c) for c in cmd]
    log("$ " + shlex.join(args))
    code = subprocess.call(args, cwd=ROOT, env=env)
    if check and code != 0:
        log(f"command failed with exit code {code}: {shlex.join(args)}")
        raise SystemExit(code)
    return code


def venv_bin(name: str) -> Path:
    """Path of an executable inside ``.venv``."""
    scripts = VENV / ("Scripts" if os.name == "nt" else "bin")
    return scripts / (f"{name}.exe" if os.name == "nt" else name)


def use_stack(stack: str) -> None:
    """Point :data:`VENV` and :data:`CONSTRAINTS` at ``stack``'s venv and constraints file (:data:`STACKS`)."""
    global VENV, CONSTRAINTS
    venv_name, constraints = STACKS[stack]
    VENV, CONSTRAINTS = ROOT / venv_name, ROOT / constraints


def setup(command: str, stack: str = "pinned", host: str | None = None) -> Path:
    """Create/reuse the stack's venv (``.venv`` for the pinned one) and install the current tree into it, with what
    ``command`` needs (:data:`INSTALL_TARGETS`; the other stacks' tests get only pytest's tools, ``.[test-stack]``)
    and ``host``, a requirement of LLaMA-Factory (main's, :func:`main_requirement`); return the venv's python."""
    python = venv_bin("python")
    with phase("venv"):
        if python.is_file():
            log(f"reusing {VENV}")
        else:
            log(f"creating {VENV}")
            venv.EnvBuilder(with_pip=True, clear=VENV.exists()).create(VENV)
    # --no-compile: pip would compile the stack's 27,900 files on one core as it installs them (about 60 s), and a
    # compileall of them all on every core still cost 76 s on CI's two cores (2026-11-26); the tests' processes import
    # about 6,000 of them, compiled on first import instead (offline_env lets Python write its .pyc files). uv does not
    # compile unless told to.
    pip = [python, "-m", "pip", "install", "--disable-pip-version-check", "--no-compile"]
    with phase("installer"):
        settings = uv_settings(python)  # None: pip has a setting uv cannot be given
        use_uv = settings is not None and run([*pip, "-q", UV], check=False) == 0
        if settings is not None and not use_uv:
            log(f"{UV} could not be installed; installing with pip")

    def install(*args: str | Path) -> None:
        if use_uv:
            options, environ = settings
            uv = [venv_bin("uv"), "pip", "install", "--python", python, *options, *args]
            if run(uv, env={**os.environ, **environ}, check=False) == 0:
                return
            log("uv failed; installing with pip instead")
        run([*pip, *args])

    with phase("torch trio"):
        install("-q", "-c", CONSTRAINTS, *TORCH_TRIO)
    target = INSTALL_TARGETS[command] if stack == "pinned" or command == "demo" else ".[test-stack]"
    target = ".[test-stack,qlora]" if target == ".[test-stack]" and stack == "main" else target  # fsdp_qlora's tests
    with phase("dependencies"):
        install("-q", "-c", CONSTRAINTS, *([host] if host else []), target)
    with phase("reinstall package"):
        install("-q", "--no-deps", "--force-reinstall", ".")
    if command == "test":
        with phase("test support"):
            install("-q", "--no-deps", "--force-reinstall", "./testing")
    return python


def main_source(pinned: bool = True) -> tuple[str, str]:
    """Where LLaMA-Factory main comes from, checked before anything is built: ``("archive", path)`` (a source archive
    with ``COMMIT`` at its top), ``("folder", path)`` (such an archive unpacked) or ``("git", url)`` (a git URL or a
    clone, installed at the pin), from ``LLAMAFACTORY_MAIN_SOURCE``, else the archive at the pin (else the newest) in
    :data:`SHARED_MAIN`;
    an archive's or folder's commit is the pinned one where ``pinned``. Else one line naming the variable, its value
    and the fix, and SystemExit(2)."""
    given = os.environ.get(MAIN_SOURCE_ENV, "").strip()
    if not given:
        # a newer main comes as another archive beside the older ones: the pinned one is tested until the pin moves
        archives = sorted(SHARED_MAIN.glob("*.tar.gz"), key=committed_at)
        if not archives:
            refuse_main_source("", f"not set, and {SHARED_MAIN} holds no *.tar.gz")
        at_pin = [archive for archive in archives if archive_commit(archive) == tested_main()["commit"]]
        given = str(at_pin[-1] if at_pin and pinned else archives[-1])
        if at_pin and archives[-1] != at_pin[-1]:
            log(f"{archives[-1].name} holds a newer main than the pin: python3 dev.py pin-main moves the pin to it")
    if "://" in given or given.startswith("git@"):
        return "git", reachable(given, given)
    path = Path(given).expanduser().resolve()
    if (path / ".git").exists():  # a clone: git installs the pinned commit, whichever the clone has checked out
        return "git", reachable(given, path.as_uri())
    if not path.exists():
        refuse_main_source(given, "no such file or folder")
    kind = "folder" if path.is_dir() else "archive"
    try:
        files = [source_file(kind, path, name) for name in (MAIN_VERSION_FILE, SOURCE_COMMIT)]
    except tarfile.TarError:
        refuse_main_source(given, "not a folder, and not a tar archive a source of main comes as")
    except OSError as error:
        refuse_main_source(given, f"cannot be read: {error}")
    missing = [name for name, file in zip((MAIN_VERSION_FILE, SOURCE_COMMIT), files, strict=True) if file is None]
    if missing:
        refuse_main_source(given, f"no {' nor '.join(missing)} in it: not LLaMA-Factory's source as an archive of main "
                                  "holds it")
    commit = files[1][0].strip()
    if not re.fullmatch(r"[0-9a-f]{40}", commit):
        refuse_main_source(given, f"its {SOURCE_COMMIT} holds {commit[:50]!r}, not a whole commit id")
    if pinned and commit != tested_main()["commit"]:
        refuse_main_source(given, f"it holds main at {commit}, {TESTED_MAIN.name} pins {tested_main()['commit']}: "
                                  "pin it with python3 dev.py pin-main, or name a source at the pin")
    return kind, str(path)


def archive_commit(archive: Path) -> str | None:
    """The commit an archive's ``COMMIT`` names; None where it cannot be read."""
    try:
        found = source_file("archive", archive, SOURCE_COMMIT)
    except (tarfile.TarError, OSError):
        return None
    return found[0].strip() if found else None


def committed_at(archive: Path) -> float:
    """When an archive's main was committed: its files' time, as git archive stamps them (a copy of the shared folder
    keeps it; the archive's own time may be the copy's); an unreadable archive's own time, so that it is said."""
    try:
        found = source_file("archive", archive, MAIN_VERSION_FILE)
    except (tarfile.TarError, OSError):
        found = None
    return found[1] if found else archive.stat().st_mtime


def refuse_main_source(given: str, why: str) -> NoReturn:
    """Log the one line saying why ``given`` cannot be LLaMA-Factory main's source, with the fix; SystemExit(2)."""
    log(f"cannot set up LLaMA-Factory main: {MAIN_SOURCE_ENV}={given} ({why}); {MAIN_SOURCE_FIX}")
    raise SystemExit(2)


def reachable(given: str, url: str) -> str:
    """``url`` where ``git ls-remote`` reaches it, else :func:`refuse_main_source`."""
    try:
        probe = subprocess.run(["git", "ls-remote", url, "HEAD"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        refuse_main_source(given, f"git ls-remote {url} failed: {error}")
    if probe.returncode != 0:
        said = (probe.stderr.strip().splitlines() or ["no message"])[0]
        refuse_main_source(given, f"not reachable, git ls-remote: {said}")
    return url


def source_file(kind: str, source: Path, name: str) -> tuple[str, float] | None:
    """The text and time of the file ``name`` (a path under the source's top) of a folder or archive source; None
    where it has none. An archive's files lie in one top folder, as git archive --prefix and sdists lay them."""
    if kind == "folder":
        path = source / name
        return (path.read_text(encoding="utf-8"), path.stat().st_mtime) if path.is_file() else None
    with tarfile.open(source) as archive:
        for member in archive:
            if member.isfile() and Path(*Path(member.name).parts[1:]).as_posix() == name:
                return archive.extractfile(member).read().decode(), member.mtime
    return None


def tested_main() -> dict[str, str]:
    """The pinned LLaMA-Factory main: ``version``, ``commit``, ``date`` (:data:`TESTED_MAIN`)."""
    return json.loads(TESTED_MAIN.read_text(encoding="utf-8"))


def main_requirement() -> str:
    """LLaMA-Factory main as a pip requirement, from :func:`main_source`: the archive or folder as it is (its ``COMMIT``
    is the pin's; the version guard reads it there), a git source at the pinned commit (its install records it)."""
    kind, where = main_source()
    if kind == "git":
        return f"llamafactory @ git+{where}@{tested_main()['commit']}"
    return f"llamafactory @ {Path(where).as_uri()}"


def cmd_pin_main(args: list[str]) -> int:
    """``pin-main [REF]``: :data:`TESTED_MAIN` set to main as ``LLAMAFACTORY_MAIN_SOURCE`` holds it
    (:func:`main_source`), with its commit date and LLaMA-Factory version: an archive's or folder's ``COMMIT``, or REF
    of a git source (a branch, tag or commit; default its HEAD), fetched at depth 1."""
    kind, where = main_source(pinned=False)
    if len(args) > (kind == "git"):
        log(f"cannot pin LLaMA-Factory main: {'one REF at most' if kind == 'git' else f'the {kind} holds one commit'}")
        return 2
    if kind != "git":
        version_file = source_file(kind, Path(where), MAIN_VERSION_FILE)
        commit = source_file(kind, Path(where), SOURCE_COMMIT)[0].strip()
        # the archive's files carry the commit's time (git archive), the date a git source's pin takes
        date = time.strftime("%Y-%m-%d", time.gmtime(version_file[1]))
        return write_pin(commit, date, version_file[0])
    with tempfile.TemporaryDirectory(prefix="hera-main-") as tmp:
        def git(*part: str) -> str:
            return subprocess.run(["git", "-C", tmp, *part], check=True, capture_output=True, text=True).stdout.strip()

        git("init", "-q")
        try:
            git("fetch", "-q", "--depth", "1", where, args[0] if args else "HEAD")
        except subprocess.CalledProcessError as error:
            said = (error.stderr.strip().splitlines() or ["no message"])[0]
            log(f"cannot fetch {args[0]} from {where} ({said}); name a branch, a tag or a whole commit")
            return 1
        return write_pin(git("rev-parse", "FETCH_HEAD"), git("log", "-1", "--format=%cs", "FETCH_HEAD"),
                         git("show", f"FETCH_HEAD:{MAIN_VERSION_FILE}"))


def write_pin(commit: str, date: str, version_file: str) -> int:
    """:data:`TESTED_MAIN` set to ``commit`` of ``date``, with the version ``version_file`` (env.py) names."""
    found = re.search(r'VERSION = "([^"]+)"', version_file)
    pin = {"version": found.group(1) if found else "unknown", "commit": commit, "date": date}
    TESTED_MAIN.write_text(json.dumps(pin, indent=2) + "\n", encoding="utf-8")
    log(f"pinned LLaMA-Factory main at {commit} ({date}, {pin['version']}) in {TESTED_MAIN}; test it: python3 dev.py "
        "test --stack main")
    return 0


# pip settings handed to uv (pip's key -> uv's option), pip settings that change nothing uv installs, and the
# ``pip config list`` sections an install reads; any other pip setting makes set-up install with pip alone
_UV_OPTIONS = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links",
               "constraint": "--constraint", "trusted-host": "--allow-insecure-host", "no-index": "--no-index"}
_UV_IGNORES = {"default-timeout", "timeout", "retries", "disable-pip-version-check", "no-cache-dir", "cache-dir",
               "progress-bar", "quiet", "verbose", "no-input", "root-user-action", "no-warn-script-location"}
_INSTALL_SECTIONS = {"global", "install", ":env:"}


def uv_settings(python: Path) -> tuple[list[str], dict[str, str]] | None:
    """pip's settings (``pip config list``: its files, then ``PIP_*``) as uv's options and environment, which uv does
    not read itself: index URLs (the last ``index-url`` wins, as in pip), find-links and constraint files (each only
    where it exists: pip skips a missing one with a warning, uv would stop), trusted hosts, ``no-index``, ``cert``
    (``SSL_CERT_FILE``); each once. None when pip has a setting uv is not given here (set-up then uses pip)."""
    listed = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    pairs = [("--index-strategy", "unsafe-best-match")]  # pip's: the best version over every index, not the first's
    environ: dict[str, str] = {}
    for line in listed.splitlines():
        key, _, shown = line.partition("=")
        section, _, name = key.rpartition(".")
        if section not in _INSTALL_SECTIONS or name in _UV_IGNORES:
            continue
        try:  # pip prints each value as Python's repr: a multi-line value holds "\n"
            value = str(ast.literal_eval(shown))
        except (ValueError, SyntaxError):
            value = shown.strip("'\"")
        if name == "cert":
            environ.update({"SSL_CERT_FILE": value} if Path(value).is_file() else {})
            continue
        flag = _UV_OPTIONS.get(name)
        if flag is None:
            log(f"pip's setting {key} has no uv option here")
            return None
        if name == "no-index":
            pairs += [(flag, "")] if value.strip().lower() in {"1", "true", "yes", "on"} else []
            continue
        if name == "index-url":
            pairs = [pair for pair in pairs if pair[0] != flag]
        for item in value.split():
            local = "://" not in item or item.startswith("file://")
            if (name == "trusted-host" or not local or Path(item.removeprefix("file://")).exists()) and (
                    flag, item) not in pairs:
                pairs.append((flag, item))
    return [part for pair in pairs for part in pair if part], environ


@contextmanager
def offline_env() -> Iterator[dict[str, str]]:
    """Environment without network access, with HF/matplotlib caches in a temporary folder."""
    tmp = Path(tempfile.mkdtemp(prefix="hera-dev-"))
    env = dict(os.environ)
    env.update(OFFLINE_ENV)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # set on the project's machines: a module compiles on first import
    env["HF_HOME"] = str(tmp / "hf_home")
    env["MPLCONFIGDIR"] = str(tmp / "mpl")
    env["VIRTUAL_ENV"] = str(VENV)
    env["PATH"] = str(venv_bin("python").parent) + os.pathsep + env.get("PATH", "")
    try:
        yield env
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def parallel_args(pytest_args: Sequence[str]) -> list[str]:
    """pytest-xdist options: one worker more than the cores (work stealing, since test durations differ by 100x):
    many tests wait while a core is free (a launch killed and reaped, a watchdog's bound, a rank's start), and a
    worker per core left 14 % of a 2-core machine idle.

    Left out when the caller chose (``-n``, ``--numprocesses``, ``-p no:xdist``) or on one core.
    """
    chose = any(arg in {"-n", "--numprocesses", "no:xdist"} or arg.startswith(("-n", "--numprocesses="))
                for arg in pytest_args)
    cores = os.cpu_count() or 1
    return [] if chose or cores < 2 else ["-n", str(min(cores + 1, 8)), "--dist", "worksteal"]


def report_args(python: Path, pytest_args: Sequence[str]) -> list[str]:
    """``--instafail`` (pytest-instafail, in the test extra): each failure's text prints when the test fails, so a
    run stopped early (Ctrl-C, a CI time limit) still shows it. Left out when the caller passed it or the venv's
    python lacks the plugin."""
    if "--instafail" in pytest_args:
        return []
    found = subprocess.run([python, "-c", "import pytest_instafail"], capture_output=True, check=False)
    return ["--instafail"] if found.returncode == 0 else []


def duration_args(pytest_args: Sequence[str]) -> list[str]:
    """``--durations=25``: the slowest tests listed after the run (what to speed up when the suite nears CI's 20
    minutes), unless the caller chose."""
    return [] if any(arg.startswith("--durations") for arg in pytest_args) else ["--durations=25"]


def cmd_test(python: Path, pytest_args: list[str]) -> int:
    """Ruff, then pytest; both always run. Exit code: pytest's, else ruff's; 'no tests' is a failure."""
    with offline_env() as env:
        lint_paths = [p for p in LINT_PATHS if (ROOT / p).exists()]
        with phase("ruff"):
            ruff_code = run([venv_bin("ruff"), "check", *lint_paths], env=env, check=False)
            # the package is kept in the formatter's layout: one statement a line, short lines for its reader
            format_paths = [p for p in FORMAT_PATHS if (ROOT / p).exists()]
            format_code = run([venv_bin("ruff"), "format", "--check", *format_paths], env=env, check=False)
            ruff_code = ruff_code or format_code
        with phase("pytest"):
            options = [*parallel_args(pytest_args), *report_args(python, pytest_args), *duration_args(pytest_args)]
            test_code = run([python, "-m", "pytest", "-q", *options, *pytest_args], env=env, check=False)
    if test_code == PYTEST_NO_TESTS:
        log("pytest collected no tests (exit code 5); treating that as a failure")
        return 1
    if test_code != 0:
        log(f"pytest failed (exit code {test_code})" + ("; ruff failed too" if ruff_code else ""))
        return test_code
    if ruff_code != 0:
        log(f"tests passed but ruff check failed (exit code {ruff_code})")
        return ruff_code
    return 0


def run_demos(python: Path, output: Path, env: dict[str, str]) -> list[int]:
    """The three demos into ``output`` on :data:`DEMO_STREAMS`, each stream one demo after another; each line a demo
    prints is printed as it comes, after its method's name (two run at once), and each demo's time is a phase of its
    own. Returns the exit codes in :data:`DEMO_METHODS`' order."""
    printing = threading.Lock()
    ended: dict[str, tuple[int, float]] = {}  # method -> (exit code, seconds)

    def demo(method: str) -> None:
        steps = [] if method == "rah" else ["--steps", str(SECOND_STACK_DEMO_STEPS)]  # RAH-LoRA takes none
        cmd = [str(part) for part in (python, "-m", "llamafactory_hera.demo", "--method", method, "--output", output,
                                      *steps, "--quiet")]
        with printing:
            log(f"$ {shlex.join(cmd)}")
        start = time.perf_counter()
        with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              errors="replace") as proc:
            for line in proc.stdout:
                with printing:
                    print(f"[{method}] {line}", end="", flush=True)
        ended[method] = proc.returncode, time.perf_counter() - start
        with printing:
            log(f"demo {method}: exit code {proc.returncode}, {ended[method][1]:.1f}s")

    with ThreadPoolExecutor(len(DEMO_STREAMS)) as pool:
        list(pool.map(lambda stream: [demo(method) for method in stream], DEMO_STREAMS))  # re-raises a stream's error
    _timings.extend((f"demo {method}", ended[method][1]) for method in DEMO_METHODS)
    return [ended[method][0] for method in DEMO_METHODS]


def cmd_test_second_stack(python: Path, pytest_args: list[str], stack: str = "oldest") -> int:
    """A stack other than the pinned one: the three demos (each into a temporary folder), then its tests
    (:data:`OLDEST_STACK_TESTS`, main's :data:`MAIN_STACK_TESTS`). Exit code: the first failure's."""
    tests = MAIN_STACK_TESTS if stack == "main" else OLDEST_STACK_TESTS
    codes = []
    with offline_env() as env:
        output = Path(env["HF_HOME"]).parent / "demo_output"
        with phase("demos"):
            codes += run_demos(python, output, env)
        with phase("pytest"):
            options = [*parallel_args(pytest_args), *report_args(python, pytest_args), *duration_args(pytest_args)]
            left_out = [*OLDEST_STACK_OPEN, *OLDEST_STACK_ENGINE_RUNS, *MAIN_STACK_LEFT_OUT * (stack == "main")]
            deselected = [arg for test in left_out for arg in ("--deselect", test)]
            codes.append(run([python, "-m", "pytest", "-q", *options, *tests, *deselected, *pytest_args], env=env,
                             check=False))
    failed = [code for code in codes if code != 0]
    return failed[0] if failed else 0


def cmd_demo(python: Path, demo_args: list[str]) -> int:
    """Run ``python -m llamafactory_hera.demo`` inside the venv."""
    with offline_env() as env, phase("demo"):
        return run([python, "-m", "llamafactory_hera.demo", *demo_args], env=env, check=False)


def cmd_costs(args: list[str]) -> int:
    """``costs``: the pinned stack's ``test`` with ``HERA_TEST_COSTS`` naming a new folder (tests/cost_record.py),
    then tests/COSTS.md written from it (tests/cost_table.py, even after a failed test: the exit code is still the
    run's); ``costs --from DIR``: the table from the recording in DIR alone, nothing set up or run."""
    if args[:1] == ["--from"] and len(args) == 2:
        folder, code = Path(args[1]).resolve(), 0
    else:
        folder = Path(tempfile.mkdtemp(prefix="hera-costs-"))
        os.environ["HERA_TEST_COSTS"] = str(folder)  # offline_env hands it to pytest and its workers
        log(f"recording each test's cost in {folder}")
        code = cmd_test(setup("test"), args)
    table = [sys.executable, ROOT / "tests" / "cost_table.py", folder, ROOT / "tests/COSTS.md"]
    return run(table, check=False) or code


def main(argv: list[str]) -> int:
    """Dispatch ``test`` / ``demo`` / ``costs``; everything after the command goes to pytest / the demo."""
    if sys.version_info < (3, 11):  # noqa: UP036 - dev.py may be started by any python3
        print(f"dev.py needs Python >= 3.11, this is {sys.version.split()[0]}", file=sys.stderr)
        return 2
    if argv and argv[0] in {"-h", "--help", "help"}:
        print(f"usage:\n{USAGE}")
        return 0
    if argv and argv[0] == "costs":
        return cmd_costs(argv[1:])
    if argv and argv[0] == "pin-main":
        return cmd_pin_main(argv[1:])
    if not argv or argv[0] not in {"test", "demo"}:
        print(f"usage:\n{USAGE}", file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    stack, rest = stack_option(command, rest)
    if stack is None:
        print(f"usage:\n{USAGE}", file=sys.stderr)
        return 2
    start, load_at_start = time.perf_counter(), load_average()
    names = tuple(STACKS) if stack == "all" else (stack,)
    try:  # main's source checked before any stack is built: a wrong one is said in seconds, not after the suite
        host = main_requirement() if "main" in names else None
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else 2
    code = 0
    for name in names:
        use_stack(name)
        log(f"=== stack {name}: {VENV.name}, {CONSTRAINTS.name}")
        try:
            python = setup(command, name, host if name == "main" else None)
            if command == "demo":
                step = cmd_demo(python, rest)
            else:
                step = cmd_test(python, rest) if name == "pinned" else cmd_test_second_stack(python, rest, name)
        except SystemExit as stop:
            step = stop.code if isinstance(stop.code, int) else 1
        except KeyboardInterrupt:
            step, code = 130, 130
            break
        code = code or step
    log("timings: " + ", ".join(f"{name} {secs:.1f}s" for name, secs in _timings)
        + f"; total {time.perf_counter() - start:.1f}s")
    log(f"exit code {code}")
    if os.environ.get("CI"):
        record_ci_run(command, code, time.perf_counter() - start, load_at_start)
    return code


def stack_option(command: str, args: list[str]) -> tuple[str | None, list[str]]:
    """``--stack NAME`` (pinned, oldest, main, all; ``test`` only takes all) taken out of ``args``; None when it is
    wrong."""
    if "--stack" not in args:
        return "pinned", args
    at = args.index("--stack")
    name = args[at + 1] if at + 1 < len(args) else ""
    choices = {*STACKS, "all"} if command == "test" else set(STACKS)
    return (name if name in choices else None), args[:at] + args[at + 2:]


def load_average() -> float:
    """The 1-minute load average (NaN where the OS has none: Windows)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def record_ci_run(command: str, code: int, seconds: float, load_at_start: float) -> None:
    """Append one line for this CI run to ``CI_TIMINGS_LOG`` (never fails the run)."""
    phases = " ".join(f"{name}={secs:.0f}s" for name, secs in _timings)
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=False).stdout.strip()
        line = (f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {head or '?'} {command} exit={code} total={seconds:.0f}s "
                f"{phases} load1_start={load_at_start:.2f} load1_end={load_average():.2f} cores={os.cpu_count()}\n")
        CI_TIMINGS_LOG.parent.mkdir(parents=True, exist_ok=True)
        with CI_TIMINGS_LOG.open("a") as log_file:
            log_file.write(line)
    except OSError as error:
        log(f"could not record CI timings in {CI_TIMINGS_LOG}: {error}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
