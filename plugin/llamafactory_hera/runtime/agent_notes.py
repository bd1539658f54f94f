"""The folder a node's launcher (torch's elastic agent) gives the ranks it starts, named in :data:`NOTES_ENV`, for
what it says once they ended: :data:`REFUSAL`, the refusal that ended the ranks, printed as the node's last line;
:data:`RECORD`, the run record rank 0 wrote ``running``, marked ended where the ranks ended without marking it (a
rank killed by SIGKILL). A rank without the variable says and records everything itself.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

NOTES_ENV = "LLAMAFACTORY_HERA_AGENT_NOTES"
REFUSAL = "refusal"
SAID = "refusal.said"  # the refusal once the launcher printed it
START = "refusal.start"  # the start of the ranks (torchrun's restart count) that noted the refusal
RECORD = "record"


def note(name: str, text: str, env: Mapping[str, str] | None = None) -> bool:
    """Leave ``text`` as note ``name`` for this node's launcher; False where none takes notes (the caller says it)."""
    # os.environ read at the call: datasets' map(num_proc=N) rebinds it to a copy, which a default keeps
    env = os.environ if env is None else env
    folder = Path(env.get(NOTES_ENV) or "")
    if not env.get(NOTES_ENV) or not folder.is_dir():
        return False
    written = folder / f"{name}.{os.getpid()}.tmp"
    try:
        written.write_text(text, encoding="utf-8")
        written.replace(folder / name)  # whole or absent: the launcher may read as the rank ends
    except OSError:
        return False
    return True


def refused(env: Mapping[str, str] | None = None) -> bool:
    """Whether a rank of this node noted a refusal (the job is ending)."""
    env = os.environ if env is None else env
    folder = Path(env.get(NOTES_ENV) or "")
    return bool(env.get(NOTES_ENV)) and ((folder / REFUSAL).is_file() or (folder / SAID).is_file())


def note_refusal(report: str, env: Mapping[str, str] | None = None) -> bool:
    """Note ``report`` as this start's refusal (:func:`note`): the start first, the refusal whole after it."""
    env = os.environ if env is None else env
    return note(START, env.get("TORCHELASTIC_RESTART_COUNT", "0"), env) and note(REFUSAL, report, env)


def last_refusal(folder: Path, max_restarts: int) -> bool:
    """Whether ``folder`` holds a refusal noted by the start after which the agent restarts no more (restart count
    ``max_restarts``). One an earlier start noted does not end the job: the ranks restarted after it."""
    return (folder / REFUSAL).is_file() and read(folder, START).strip() == str(max_restarts)


def say_refusal(folder: Path, max_restarts: int) -> bool:
    """Print the last start's refusal noted in ``folder`` (to stderr, where the ranks would have), once; False where
    none (an earlier start's is not this failure's cause)."""
    if not last_refusal(folder, max_restarts):
        return False
    refusal = read(folder, REFUSAL)
    if refusal:
        print(refusal, end="", file=sys.stderr, flush=True)
        with contextlib.suppress(OSError):
            (folder / REFUSAL).replace(folder / SAID)
    return bool(refusal)


def read(folder: Path, name: str) -> str:
    try:
        return (folder / name).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return ""


@contextlib.contextmanager
def taking(max_restarts: int | None = None) -> Iterator[Path]:
    """The notes folder of the ranks started in the block (their environment is this process's): the one this process
    was started with (by ``llamafactory-cli``), else a fresh one, removed after the block. Given ``max_restarts``, a
    block that raised (the launch failed) prints the last start's refusal if no launcher did; one that returned prints
    nothing."""
    given = os.environ.get(NOTES_ENV)
    if given and Path(given).is_dir():
        yield Path(given)
        return
    folder = Path(tempfile.mkdtemp(prefix="llamafactory_hera_notes."))
    os.environ[NOTES_ENV] = str(folder)
    try:
        yield folder
    except BaseException:
        if max_restarts is not None:
            say_refusal(folder, max_restarts)
        raise
    finally:
        if given is None:
            os.environ.pop(NOTES_ENV, None)
        else:
            os.environ[NOTES_ENV] = given
        shutil.rmtree(folder, ignore_errors=True)
