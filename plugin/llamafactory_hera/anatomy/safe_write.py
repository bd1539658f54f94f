"""Writing files the selection produces: atomically, keeping permission bits, and checking beforehand that a
folder can take them (so a long scoring is never lost to a PermissionError at the end)."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path


def _default_mode() -> int:
    """Permission bits a newly created file gets under the current umask."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def write_text_atomic(path: Path, text: str, *, mode: int | None = None) -> None:
    """Write via a temp file in the same directory + flush + fsync + os.replace; keep the original file's
    permission bits; on any error the original file is untouched and the temp file removed.

    The text is written as UTF-8 bytes exactly as given (no newline translation). A symlink is followed, so
    the link stays and its target is replaced. ``mode`` sets the permission bits of a file that does not
    exist yet (default: what the umask gives a new file).
    """
    target = Path(os.path.realpath(path))
    try:
        mode = stat.S_IMODE(target.stat().st_mode)
    except FileNotFoundError:
        mode = _default_mode() if mode is None else mode
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(text.encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, mode)
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    with contextlib.suppress(OSError):  # persist the rename itself; not possible on every platform
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def check_folder_writable(folder: Path, what: str) -> None:
    """Raise (PermissionError naming the folder and ``what`` goes there) unless a file can be created in ``folder``.

    Probed by creating and removing a temporary file, which is exact for every user (root included).
    """
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".hera_write_probe."):
            pass
    except OSError as err:
        raise PermissionError(f"cannot write {what} into {folder} ({type(err).__name__}: {err.strerror}); nothing "
                              "was scored. Make the folder writable, or pass --output NEW.yaml in a writable "
                              "folder.") from None
