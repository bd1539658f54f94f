"""The plugin's user-error type, :class:`RecipeError`, and its one-line report: the plugin's checks raise it with a
message that names the key, the value and the fix; when one ends the process, only that message is printed (and a line
saying how to get the traceback). Every other exception, a ``ValueError`` of torch or of the plugin's
own internals included, keeps Python's full report.

A refusal in a rank of a multi-process job (torchrun, ``accelerate launch``, ``srun`` tasks) is printed once, by the
first rank to refuse, and ends the job's other ranks within seconds (:mod:`llamafactory_hera.job_refusal`, through
the job's store); where no store can be reached, rank 0 of a torchrun job prints it and another rank waits up to
:data:`RANK_WAIT_S` for torchrun's agent to stop it. ``llamafactory-cli train`` and ``accelerate launch`` check the
recipe before they start the ranks (``llamafactory_hera_patches.launch``, ``.accelerate_launch``).
"""

from __future__ import annotations

from collections.abc import Mapping

from llamafactory_hera_patches.errors import RecipeError

__all__ = ["RecipeError", "raised_by_plugin", "short_report", "waits_for_rank_0"]
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
