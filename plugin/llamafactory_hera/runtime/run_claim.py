"""One live run per ``output_dir``: ``llamafactory_hera_claim.json``, taken before the parse (imports nothing heavy).
Policy: docs/hera.md ("Running again: resume, refuse, overwrite").

A claim is written aside and hard-linked in place: of two runs started at once, one gets it. Only the takeover lock's
holder replaces a stale claim; one another rank made passes to global rank 0, which saves last.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import functools
import json
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from llamafactory_hera.runtime import claim_folders
from llamafactory_hera.runtime.claim_folders import CLAIM
from llamafactory_hera.runtime.claim_identity import global_rank, is_alive_here, job_identity, process_stat, restarts
from llamafactory_hera.runtime.errors import RecipeError
from llamafactory_hera.runtime.log import line
from llamafactory_hera.runtime.raw_recipe import raw_value
from llamafactory_hera.runtime.run_record import write_record
from llamafactory_hera.runtime.save_signal import RERUN

_ATTEMPTS = 8
LEASE_SECONDS = 600  # a claim not refreshed this long is a dead run's (any host)
_REFRESH_SECONDS = 60  # how often a live run refreshes its claim's file time
_LOCK_STALE_SECONDS = 10.0  # an older takeover lock is a dead run's
JOB_WAIT_SECONDS = 20.0  # a rank's wait for its job to take over another host's claim
_held: dict[Path, dict[str, Any]] = {}  # this process's claims by file; released at exit
_guards: list[bool] = []  # refresher and SIGTERM release started (once)


def new_claim(stage: str, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    # not a default: datasets' map(num_proc=N) rebinds os.environ
    env = os.environ if env is None else env
    stat = process_stat(os.getpid())
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "process_start": stat[1] if stat else None,
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "stage": stage,
        "job": job_identity(env),
        "scheduler_job": env.get("SLURM_JOB_ID") or None,
        "restarts": restarts(env),
        "token": uuid.uuid4().hex,
    }


def _create(path: Path, claim: dict[str, Any]) -> bool:
    text = json.dumps(claim, indent=2)
    temporary = path.with_name(f"{CLAIM}.{claim['host']}.{claim['pid']}.{claim['token'][:8]}.tmp")
    temporary.write_text(text, encoding="utf-8")
    try:
        os.link(temporary, path)  # all or nothing: another run never reads half a claim
        return True
    except FileExistsError:
        return False
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOSYS):
            raise
    finally:
        temporary.unlink(missing_ok=True)
    try:  # a file system without hard links
        descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        file.write(text)
    return True


def _read(path: Path) -> tuple[str, dict[str, Any]] | None:
    """(the claim's text, the claim or ``{}`` when it is no JSON object), or None when there is none."""
    for attempt in range(3):
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            claim = json.loads(text)
        except json.JSONDecodeError:
            claim = None
        if isinstance(claim, dict):
            return text, claim
        if attempt < 2:
            time.sleep(0.2)  # being written (a file system without hard links)
    return text, {}


@contextlib.contextmanager
def _takeover_lock(path: Path, mine: dict[str, Any]) -> Iterator[bool]:
    """Whether this run holds the takeover lock for the block; only its holder moves a claim it did not create (moving
    a claim aside and back could drop a fresh one)."""
    lock = path.with_name(f"{CLAIM}.takeover")
    if not _create(lock, mine):
        _clear_stale_lock(lock)
        yield False
        return
    try:
        yield True
    finally:
        held = _read(lock)
        if held is not None and held[1].get("token") == mine["token"]:
            lock.unlink(missing_ok=True)


def _take_over(path: Path, seen: str, mine: dict[str, Any], claim: dict[str, Any] | None = None) -> bool:
    """Replace the claim whose text is ``seen`` by ``claim`` (default ``mine``); False when another run is taking it
    over or replaced it."""
    with _takeover_lock(path, mine) as locked:
        if not locked:
            return False
        found = _read(path)
        if found is None or found[0] != seen:
            return False
        write_record(path, mine if claim is None else claim)  # all or nothing
        return True


def _clear_stale_lock(lock: Path) -> None:
    age = _age(lock)
    found = _read(lock) if age is not None and age > _LOCK_STALE_SECONDS else None
    if found is None:
        return
    aside = lock.with_name(f"{lock.name}.{uuid.uuid4().hex[:8]}.stale")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return
    try:
        if aside.read_text(encoding="utf-8") != found[0]:
            with contextlib.suppress(FileExistsError):  # a fresh lock, moved by mistake: back in place
                os.link(aside, lock)
    finally:
        aside.unlink(missing_ok=True)


def _describe(claim: dict[str, Any]) -> str:
    stage = f", stage {claim['stage']}" if claim.get("stage") else ""
    return (
        f"process {claim.get('pid', '?')} on host {claim.get('host', '?')}, started "
        f"{claim.get('started', 'at an unknown time')}{stage}"
    )


def _refuse(folder: Path, path: Path, other: dict[str, Any], here: bool) -> RecipeError:
    ways = (
        f"Wait for it to end or stop it (kill {other.get('pid')}), then {RERUN}; or set another output_dir."
        if here
        else f"Wait for it to end (if it is no longer running, delete {path}), then {RERUN}; or set another output_dir."
    )
    return RecipeError(
        f"output_dir: {folder} is in use by another run ({_describe(other)}); two runs in one folder "
        f"write over each other's files, overwrite_output_dir: true included. {ways}"
    )


def _age(path: Path) -> float | None:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return None


def _refresh() -> None:
    while True:
        time.sleep(_REFRESH_SECONDS)
        for path, mine in list(_held.items()):
            if mine["pid"] == os.getpid():
                with contextlib.suppress(OSError):
                    os.utime(path)


def _release_on_sigterm(signum: int, frame: Any, previous: Any = signal.SIG_DFL) -> None:
    _release_all()
    if callable(previous):
        previous(signum, frame)
        return
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _guard() -> None:
    """Once per process: refresh the claims, and release them on SIGTERM (which skips ``atexit``) before the earlier
    handler."""
    if _guards:
        return
    _guards.append(True)
    threading.Thread(target=_refresh, name="llamafactory-hera claim", daemon=True).start()
    if threading.current_thread() is threading.main_thread():
        previous = signal.getsignal(signal.SIGTERM)
        if previous is not signal.SIG_IGN:
            signal.signal(signal.SIGTERM, functools.partial(_release_on_sigterm, previous=previous))


def _forget_in_child() -> None:
    """In a forked worker: no claim, no guard, SIGTERM's earlier handler back: a worker that ``Pool.terminate()`` stops
    in a lock must die at once, else the run hangs in the pool's join."""
    _held.clear()
    _guards.clear()
    handler = signal.getsignal(signal.SIGTERM)
    if isinstance(handler, functools.partial) and handler.func is _release_on_sigterm:
        previous = handler.keywords["previous"]  # None: set outside Python, not restorable
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _earlier_launch(other: dict[str, Any], mine: dict[str, Any]) -> bool:
    """Whether ``other`` is an earlier launch's of this Slurm job: stale wherever made."""
    return (
        mine.get("scheduler_job") is not None
        and other.get("scheduler_job") == mine["scheduler_job"]
        and isinstance(other.get("restarts"), int)
        and other["restarts"] < mine["restarts"]
    )


def _stale(other: dict[str, Any], mine: dict[str, Any], here: bool, age: float | None) -> str | None:
    if not other:
        return f"an unreadable claim ({CLAIM})"
    if here and not is_alive_here(other.get("pid"), other.get("process_start")):
        return f"the claim of {_describe(other)}, which is no longer running"
    if _earlier_launch(other, mine):
        return (
            f"the claim of {_describe(other)}, launch {other['restarts']} of this job (Slurm job "
            f"{mine['scheduler_job']}, now launch {mine['restarts']}: requeued)"
        )
    if not here and age is not None and age > LEASE_SECONDS:
        return f"the claim of {_describe(other)}, not refreshed for {age / 60:.0f} minutes"
    return None


def _adopt(path: Path, text: str, other: dict[str, Any], mine: dict[str, Any]) -> dict[str, Any] | None:
    """Global rank 0 takes over its job's claim made by another rank, whose run may end while rank 0 still saves."""
    adopted = {
        **other,
        "pid": mine["pid"],
        "host": mine["host"],
        "process_start": mine["process_start"],
        "token": mine["token"],
    }
    return adopted if _take_over(path, text, mine, adopted) else None


def take(folder: Path, stage: str, env: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """Claim ``folder``: the claim made or taken (to release), or None when this run's job holds it. RecipeError when a
    live run of another job holds it."""
    env = os.environ if env is None else env
    path = folder / CLAIM
    mine = new_claim(stage, env)
    attempts = 0
    wait_until = time.monotonic() + JOB_WAIT_SECONDS
    while attempts < _ATTEMPTS:
        attempts += 1
        if _create(path, mine):
            return _hold(path, mine)
        found = _read(path)
        if found is None:
            continue  # released meanwhile
        text, other = found
        here = not other or other.get("host") == mine["host"]  # an unreadable claim names no live process
        why = _stale(other, mine, here, _age(path))
        if why is not None:
            if _take_over(path, text, mine):
                print(line(f"output_dir: {folder}: took over {why}."), flush=True)
                return _hold(path, mine)
            attempts -= 1  # another run is taking it over: its claim comes next
            time.sleep(0.05)
            continue
        if mine["job"] is not None and other.get("job") == mine["job"]:
            if global_rank(env) == 0 and (other.get("pid"), other.get("host")) != (mine["pid"], mine["host"]):
                adopted = _adopt(path, text, other, mine)
                if adopted is None:
                    continue
                return _hold(path, adopted)
            return None  # another rank of this job holds it
        if mine["job"] is not None and not here and time.monotonic() < wait_until:
            attempts -= 1  # uncounted: this job's rank on that host may be taking it over
            time.sleep(0.5)
            continue
        if _read(path) != found:  # replaced since read (the age was the new claim's)
            continue
        raise _refuse(folder, path, other, here)
    raise RecipeError(
        f"output_dir: {folder}: could not claim it ({path} changed {_ATTEMPTS} times while this run "
        "tried); other runs are starting into it. Set an output_dir of its own for each run."
    )


def _hold(path: Path, claim: dict[str, Any]) -> dict[str, Any]:
    _held[path] = claim
    _guard()
    return claim


def release(path: Path) -> None:
    mine = _held.pop(path, None)
    if mine is None or mine["pid"] != os.getpid():
        return
    found = _read(path)
    if found is not None and found[1].get("token") == mine["token"]:
        path.unlink(missing_ok=True)


def _release_all() -> None:
    for path in list(_held):
        release(path)


atexit.register(_release_all)
if hasattr(os, "register_at_fork"):  # POSIX: Windows has no fork
    os.register_at_fork(after_in_child=_forget_in_child)


def _missing_folders(folder: Path) -> list[Path]:
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


@contextlib.contextmanager
def claimed(host_args: Any, stage: str) -> Iterator[None]:
    """``output_dir`` claimed for the block (not without one, nor when unwritable), then released; the folders the claim
    made are removed if empty (a refused run leaves none)."""
    value = raw_value(host_args, "output_dir")
    if not value:
        yield
        return
    folder = Path(str(value)).expanduser().resolve()
    made = _missing_folders(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        mine = take(folder, stage)
    except OSError:  # unwritable: no files to lose; its checks name it
        mine = None
        _remove_empty(made)
        made = []
    except BaseException:
        _remove_empty(made)
        raise
    if made:
        claim_folders.made.add(folder)
    try:
        yield
    finally:
        claim_folders.made.discard(folder)
        if mine is not None:
            release(folder / CLAIM)
        _remove_empty(made)


def _remove_empty(folders: list[Path]) -> None:
    for made in folders:
        try:
            made.rmdir()
        except OSError:
            return  # not empty (the run wrote into it), or gone
