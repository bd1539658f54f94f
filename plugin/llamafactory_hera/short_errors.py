"""HeRA's own error messages without the traceback around them.

A bad recipe value (``hera_heads: [L9H0]``) used to end a ``llamafactory-cli train`` run with a ~20-line traceback
through LLaMA-Factory and the plugin, the message on the last line. Such errors are deliberate: the plugin raised
them with a message that names the key, the value and the fix. When one ends the process, only that message is
printed (and a line saying how to get the traceback); every other exception keeps Python's full report.
"""

from __future__ import annotations

import linecache
import os
import sys
from types import TracebackType

PACKAGE = __name__.rpartition(".")[0]  # "llamafactory_hera"
TRACEBACK_ENV = "LLAMAFACTORY_HERA_TRACEBACK"


class RecipeError(ValueError):
    """A user error found by the plugin's checks (recipe, data, environment, command line): its message names the
    key or input, the value and the fix. A ``ValueError``, so callers catching that still do."""


USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError, RuntimeError)


def raised_by_plugin(error: BaseException) -> bool:
    """True if ``error`` is a message the plugin raised on purpose (its ``raise`` is in this package's code).

    The innermost frame of the traceback is where the exception was raised; a ValueError from torch or
    LLaMA-Factory has its innermost frame there, not here, and keeps its full traceback. Frames are told by their
    module name (``llamafactory_hera`` and ``llamafactory_hera_patches``), whatever the install layout. The line
    must be a ``raise`` statement: an error of a C operation the plugin calls (a CUDA out-of-memory error in
    ``a @ b``) also has its innermost Python frame in the plugin, and keeps its traceback.
    """
    if not isinstance(error, USER_ERRORS):
        return False
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    module = str(tb.tb_frame.f_globals.get("__name__", ""))
    if not any(module == name or module.startswith(name + ".") for name in (PACKAGE, PACKAGE + "_patches")):
        return False
    line = linecache.getline(tb.tb_frame.f_code.co_filename, tb.tb_lineno, tb.tb_frame.f_globals).lstrip()
    return line.startswith("raise ")


def short_report(error: BaseException) -> str:
    """``[llamafactory-hera] error: <message>`` and how to see the whole traceback."""
    return (f"[llamafactory-hera] error: {error}\n"
            f"[llamafactory-hera] (raised by the plugin's checks; {TRACEBACK_ENV}=1 prints the full traceback)\n")


def install() -> None:
    """Route uncaught plugin errors to :func:`short_report` (idempotent; off with LLAMAFACTORY_HERA_TRACEBACK=1)."""
    previous = sys.excepthook
    if getattr(previous, "_hera", False) or os.environ.get(TRACEBACK_ENV, "") not in {"", "0"}:
        return

    def excepthook(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
        if raised_by_plugin(error):
            sys.stderr.write(short_report(error))
            sys.stderr.flush()
        else:
            previous(kind, error, tb)

    excepthook._hera = True  # type: ignore[attr-defined]
    sys.excepthook = excepthook
