"""The plugin's user-error type, :class:`RecipeError`, and its one-line report.

A bad recipe value (``hera_heads: [L9H0]``) used to end a ``llamafactory-cli train`` run with a ~20-line traceback
through LLaMA-Factory and the plugin, the message on the last line. The plugin's checks raise :class:`RecipeError`
with a message that names the key, the value and the fix; when one ends the process, only that message is printed
(and a line saying how to get the traceback). Every other exception, a ``ValueError`` of torch or of the plugin's
own internals included, keeps Python's full report.

Under torchrun every rank checks the same recipe and used to print the same line (8 copies on 8 GPUs). In a rank of a
torchrun job (``TORCHELASTIC_RUN_ID`` set), rank 0 prints it; another rank waits up to :data:`RANK_WAIT_S` for
torchrun's agent, which stops every rank once one has failed, and prints its own only if it is still running then (a
refusal that rank 0 did not reach). torchrun's own report of the failed job (its ``ChildFailedError``) follows;
``llamafactory-cli train`` checks the recipe before it starts torchrun (``llamafactory_hera_patches.launch``).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Mapping
from types import TracebackType

from llamafactory_hera_patches.errors import RecipeError

__all__ = ["RecipeError", "install", "raised_by_plugin", "short_report", "waits_for_rank_0"]
TRACEBACK_ENV = "LLAMAFACTORY_HERA_TRACEBACK"
RANK_WAIT_S = 30.0  # how long a rank other than 0 waits for torchrun to stop it before printing its own refusal


def raised_by_plugin(error: BaseException) -> bool:
    """True if ``error`` is one of the plugin's user errors (a :class:`RecipeError`), printed alone."""
    return isinstance(error, RecipeError)


def short_report(error: BaseException) -> str:
    """How to see the whole traceback, then ``[llamafactory-hera] error: <message>``: the message is the last line
    the run prints."""
    return (f"[llamafactory-hera] (raised by the plugin's checks; {TRACEBACK_ENV}=1 prints the full traceback)\n"
            f"[llamafactory-hera] error: {error}\n")


def waits_for_rank_0(environ: Mapping[str, str]) -> bool:
    """Whether this process is a rank other than 0 of a torchrun job (whose agent stops every rank when one fails)."""
    return bool(environ.get("TORCHELASTIC_RUN_ID")) and environ.get("RANK", "0").strip() not in {"", "0"}


def _tell_torchrun(environ: Mapping[str, str]) -> None:
    """In a torchrun rank, the error file its agent reads (``TORCHELASTIC_ERROR_FILE``): its report of the failed job
    then points at the line above instead of saying how to get a traceback."""
    path = environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    note = "refused by llamafactory-hera's checks: see the [llamafactory-hera] error line above"
    with contextlib.suppress(OSError), open(path, "w", encoding="utf-8") as file:
        # the form torch's own @record writes (a bare string message makes the agent warn twice)
        json.dump({"message": {"message": note, "extraInfo": {"timestamp": str(int(time.time()))}}}, file)


def install() -> None:
    """Route uncaught plugin errors to :func:`short_report` (idempotent; off with LLAMAFACTORY_HERA_TRACEBACK=1)."""
    previous = sys.excepthook
    if getattr(previous, "_llamafactory_hera", False) or os.environ.get(TRACEBACK_ENV, "") not in {"", "0"}:
        return

    def excepthook(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
        if raised_by_plugin(error):
            if waits_for_rank_0(os.environ):
                time.sleep(RANK_WAIT_S)  # torchrun's agent stops this rank once rank 0 has failed
            sys.stderr.write(short_report(error))
            _tell_torchrun(os.environ)
            sys.stderr.flush()
        else:
            previous(kind, error, tb)

    excepthook._llamafactory_hera = True  # type: ignore[attr-defined]
    sys.excepthook = excepthook
