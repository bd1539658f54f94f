"""The plugin's commands keep the terminal for their own lines; the host's output goes to a log file.

Inside :func:`host_output_to`, file descriptors 1 and 2 (Python loggers, ``warnings``, tqdm bars and C extensions
alike: hundreds of lines while a model loads) write to a log file, and the plugin's own lines (:func:`show`) and
progress bars (:func:`progress_file`) go to the terminal. Outside it (and with ``--verbose``) both are the ordinary
streams.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

# (terminal stdout, terminal stderr) while host output is redirected; innermost last
_terminals: list[tuple[TextIO, TextIO]] = []


def show(*values: object) -> None:
    """``print`` to the terminal, also while host output goes to the log."""
    print(*values, file=_terminals[-1][0] if _terminals else sys.stdout, flush=True)


def progress_file() -> TextIO | None:
    """The stream for the plugin's own progress bars (tqdm's ``file``): the terminal's stderr while host output is
    redirected, else None (tqdm's default, ``sys.stderr``)."""
    return _terminals[-1][1] if _terminals else None


def _reopened(fd: int) -> TextIO:
    return os.fdopen(os.dup(fd), "w", buffering=1, encoding="utf-8", errors="replace")


@contextlib.contextmanager
def host_output_to(log_path: Path | None) -> Iterator[None]:
    """Send the process's stdout/stderr to ``log_path`` (created or replaced) for the block; ``None``: leave them.

    On leaving (also on an error), the streams are restored and one line names the log, so an error printed next
    is on the terminal and the host's lines before it are in the file.
    """
    if log_path is None:
        yield
        return
    log_path = Path(log_path)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = (os.dup(1), os.dup(2))
    terminal = (_reopened(saved[0]), _reopened(saved[1]))
    with open(log_path, "wb", buffering=0) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        _terminals.append(terminal)
        try:
            yield
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(OSError, ValueError):
                    stream.flush()
            _terminals.pop()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            for stream in terminal:
                stream.close()
    print(f"host output (transformers, LLaMA-Factory, warnings): {log_path} (--verbose prints it here)", flush=True)
