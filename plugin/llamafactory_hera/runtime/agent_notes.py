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


def say_refusal(folder: Path) -> bool:
    """Print the refusal noted in ``folder`` (to stderr, where the ranks would have), once; False where none."""
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
def taking() -> Iterator[Path]:
    """The notes folder of the ranks started in the block (their environment is this process's): the one this process
    was started with (by ``llamafactory-cli``), else a fresh one, removed after the block, its refusal printed if no
    launcher did."""
    given = os.environ.get(NOTES_ENV)
    if given and Path(given).is_dir():
        yield Path(given)
        return
    folder = Path(tempfile.mkdtemp(prefix="llamafactory_hera_notes."))
    os.environ[NOTES_ENV] = str(folder)
    try:
        yield folder
    finally:
        if given is None:
            os.environ.pop(NOTES_ENV, None)
        else:
            os.environ[NOTES_ENV] = given
        say_refusal(folder)
        shutil.rmtree(folder, ignore_errors=True)
