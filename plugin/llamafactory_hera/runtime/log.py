"""The one log helper: what the plugin tells the terminal and, in a run LlamaBoard launched (``LLAMABOARD_ENABLED=1``,
``LLAMABOARD_WORKDIR``), LlamaBoard's monitor: ``stage: rah`` has no Trainer to write ``running_log.txt`` (the log box)
and ``trainer_log.jsonl`` (the progress bar; LLaMA-Factory 0.9.5 reads its last line). Inside :func:`host_output_to`,
fds 1 and 2 go to a log file while the plugin's lines (:func:`show`) and bars (:func:`progress_file`) keep the terminal.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

PREFIX = "[llamafactory-hera]"  # starts every plugin line (demo/console.py picks them out by it)
RUNNING_LOG = "running_log.txt"
TRAINER_LOG = "trainer_log.jsonl"
PHASE_KEY = "rah_phase"  # marks a trainer_log line as RAH-LoRA progress (the panel draws it, not a loss)


def board_dir() -> Path | None:
    workdir = os.environ.get("LLAMABOARD_WORKDIR")
    return Path(workdir) if os.environ.get("LLAMABOARD_ENABLED") == "1" and workdir else None


def _append(name: str, text: str) -> None:
    folder = board_dir()
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / name, "a", encoding="utf-8") as log:
            log.write(text + "\n")


def line(message: str) -> str:
    return f"{PREFIX} {message}"


def say(message: str) -> None:
    """One line on the terminal, and in LlamaBoard's log box under LlamaBoard."""
    print(line(message), flush=True)
    _append(RUNNING_LOG, line(message))


def say_apart(message: str) -> None:
    """:func:`say` after a newline: a bar's ``\\r`` left the line open (a log of both streams would join them)."""
    print(f"\n{line(message)}", flush=True)
    _append(RUNNING_LOG, line(message))


def _another_rank() -> bool:
    """Whether this is a rank > 0 of a running torch.distributed group."""
    torch = sys.modules.get("torch")
    distributed = getattr(torch, "distributed", None)
    return bool(
        distributed is not None
        and distributed.is_available()
        and distributed.is_initialized()
        and distributed.get_rank()
    )


def say_once(message: str) -> None:
    if not _another_rank():
        say(message)


def first_on_node() -> bool:
    """Whether this process is its node's first rank: ``LOCAL_RANK`` 0 (-1 is transformers' "not distributed"), else
    rank 0 of the group."""
    try:
        return int(os.environ["LOCAL_RANK"]) <= 0
    except (KeyError, ValueError):
        return not _another_rank()


def say_on_each_node(message: str) -> None:
    """:func:`say` on each node's first rank, naming the node in a job of several (SLURM's sbatch writes every node's
    output into one file)."""
    if not first_on_node():
        return
    try:
        several = int(os.environ["WORLD_SIZE"]) > int(os.environ["LOCAL_WORLD_SIZE"])
    except (KeyError, ValueError):
        several = False
    say(f"{message} (node {socket.gethostname()})" if several else message)


SAY_AGAIN = "LLAMAFACTORY_HERA_SAY_AGAIN"  # lines said before LogCallback emptied running_log.txt


def say_before_callbacks(message: str) -> None:
    """:func:`say`, kept for :func:`say_again_on_board`: LLaMA-Factory's LogCallback empties running_log.txt when
    the run builds it, after the recipe checks (a launcher's ranks inherit the kept lines)."""
    say(message)
    if board_dir() is not None:
        os.environ[SAY_AGAIN] = "\n".join(filter(None, [os.environ.get(SAY_AGAIN), message]))


def say_again_on_board() -> None:
    for kept in os.environ.pop(SAY_AGAIN, "").splitlines():
        say_once(kept)


def progress_once(items: Iterable[Any], label: str) -> Iterable[Any]:
    from tqdm.auto import tqdm  # lazy: only when a bar is drawn

    return tqdm(list(items), desc=label, disable=_another_rank(), leave=False)


def _clock(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def progress_line(phase: str, done: int, total: int, elapsed: float) -> dict[str, Any]:
    remaining = elapsed / done * (total - done) if done else 0.0
    return {
        "current_steps": done,
        "total_steps": total,
        "percentage": round(100.0 * done / max(total, 1), 2),
        "elapsed_time": _clock(elapsed),
        "remaining_time": _clock(remaining),
        PHASE_KEY: phase,
    }


def progress(items: Iterable[Any], label: str) -> Iterator[Any]:
    from tqdm.auto import tqdm  # lazy: only when a bar is drawn

    listed = list(items)
    started = time.perf_counter()
    for done, item in enumerate(tqdm(listed, desc=label), start=1):
        yield item
        _append(TRAINER_LOG, json.dumps(progress_line(label, done, len(listed), time.perf_counter() - started)))


def start_board_files() -> None:
    """Remove an earlier run's progress file (its lines would move the bar)."""
    folder = board_dir()
    if folder is not None and (folder / TRAINER_LOG).is_file():
        (folder / TRAINER_LOG).unlink()


Progress = Callable[[Iterable[Any], str], Iterable[Any]]


# (terminal stdout, terminal stderr) while host output is redirected; innermost last
_terminals: list[tuple[TextIO, TextIO]] = []


def show(*values: object) -> None:
    print(*values, file=_terminals[-1][0] if _terminals else sys.stdout, flush=True)


def progress_file() -> TextIO | None:
    return _terminals[-1][1] if _terminals else None


def _reopened(fd: int) -> TextIO:
    return os.fdopen(os.dup(fd), "w", buffering=1, encoding="utf-8", errors="replace")


@contextlib.contextmanager
def host_output_to(log_path: Path | None) -> Iterator[None]:
    """Send stdout/stderr to ``log_path`` (replaced) for the block; ``None``: leave them. On leaving they are restored
    and one line names the log."""
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
