"""torch's elastic agent in a launcher of LLaMA-Factory's training (torchrun, ``accelerate launch``, ``ft_launcher``):
its ranks get a notes folder (:mod:`llamafactory_hera.runtime.agent_notes`) and, where they can restart a plugin stage,
a store for each start (:mod:`llamafactory_hera.runtime.elastic`). Once they ended:

- a refusal a rank of the last start noted is the node's last line where the launch failed, exit code 1, instead of
  the launcher's report of failed ranks; a failure without one keeps that report;
- a run record they left ``running`` (a rank killed by SIGKILL) is ended ``failed``, naming the rank and how it ended.

Checked on torch 2.6 to 2.11 and nvidia-resiliency-ext 0.4: ``launch_agent(config, entrypoint, args)`` returns or
raises once the agent has ended every rank of its node (on another shape, nothing).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from llamafactory_hera.runtime import agent_notes, elastic, run_record
from llamafactory_hera.runtime.log import line
from llamafactory_hera.runtime.raw_recipe import given_keys
from llamafactory_hera.runtime.registry import method_for_stage


def apply(module: ModuleType) -> None:
    """Wrap ``module.launch_agent`` (torch's launcher API, or ft_launcher's copy of it)."""
    if getattr(module, "_llamafactory_hera_patched", False) or not callable(getattr(module, "launch_agent", None)):
        return
    module.launch_agent = functools.partial(launch_agent, module.launch_agent)
    module._llamafactory_hera_patched = True


def launch_agent(original: Any, config: Any, entrypoint: Any, args: Any) -> Any:
    """The agent's run with its ranks' notes: their refusal said last, their unended record ended; a store for each
    start of a plugin stage's ranks where they can restart."""
    restarts = int(getattr(config, "max_restarts", 0) or 0)
    if _can_restart(config) and _runs_plugin_stage(args):
        # read by torch's c10d rendezvous at each round, after this (runtime/elastic.py says why); a value set by
        # hand is kept
        os.environ.setdefault(elastic.SWITCH, "1")
    started_ns = time.time_ns()
    with agent_notes.taking() as notes, _quiet_after_refusal(notes, restarts):
        try:
            result = original(config, entrypoint, args)
        except BaseException as error:
            _end_record(notes, started_ns, ended_how(error))
            if not agent_notes.say_refusal(notes, restarts):
                raise
            raise SystemExit(1) from None  # the refusal said: no launcher report after it
        # a run that ended well recorded it; here only one whose launcher gave up on its ranks (ft_launcher: a node
        # found unhealthy) is still running
        _end_record(notes, started_ns, "the launcher ended without the ranks' results")
        return result


def _can_restart(config: Any) -> bool:
    """Whether the agent can restart its ranks: ``max_restarts`` > 0, or a node range (a node joining restarts them)."""
    nodes_differ = getattr(config, "min_nodes", 1) != getattr(config, "max_nodes", 1)
    return int(getattr(config, "max_restarts", 0) or 0) > 0 or nodes_differ


def _runs_plugin_stage(args: Any) -> bool:
    """Whether the ranks' arguments name a plugin stage: a recipe file and its ``key=value`` overrides (``launcher.py
    recipe.yaml``, after torchrun's ``-u``), else ``--stage``. Another script's arguments name none: torch's default
    kept."""
    from .recipe.recipe_file import read_args_unchecked  # lazy: yaml and omegaconf only for a launch that restarts

    words = [str(arg) for arg in args or ()]
    recipes = [index for index, word in enumerate(words) if word.endswith((".yaml", ".yml", ".json"))]
    try:
        raw = read_args_unchecked(argv=["", *words[recipes[0] :]]) if recipes else words
        return method_for_stage(given_keys(raw).get("stage")) is not None
    except Exception:  # unreadable: the ranks name the mistake
        return False


_AGENT_LOGGERS = ("torch.distributed.elastic", "nvidia_resiliency_ext.fault_tolerance")


@contextlib.contextmanager
def _quiet_after_refusal(notes: Path, max_restarts: int) -> Iterator[None]:
    """The agent's loggers (torch's, ft_launcher's) silent once a rank of the last start noted a refusal: their lines
    on its ranks' exit codes would follow the refusal the launcher prints. An earlier start's refusal silences
    nothing: the ranks restart."""

    def before_refusal(record: logging.LogRecord) -> bool:
        return not agent_notes.last_refusal(notes, max_restarts)

    loggers = [
        logging.getLogger(name) for name in list(logging.root.manager.loggerDict) if name.startswith(_AGENT_LOGGERS)
    ]
    for logger in loggers:
        logger.addFilter(before_refusal)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(before_refusal)


def ended_how(error: BaseException) -> str:
    """How the launcher's ranks ended, for the record: the first failed rank and its exit code or signal."""
    first_failure = getattr(error, "get_first_failure", None)
    if not callable(first_failure):
        kind = type(error).__name__
        said = str(error).strip().splitlines()
        return f"the launcher ended ({kind}: {said[0]})" if said else f"the launcher ended ({kind})"
    rank, failure = first_failure()
    code = int(getattr(failure, "exitcode", 1) or 1)
    how = f"exited with code {code}"
    if code < 0:
        try:
            how = f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            how = f"was killed by signal {-code}"
    return f"rank {rank} {how}"


def _end_record(notes: Path, started_ns: int, how: str) -> None:
    """End the run record the ranks named (global rank 0's node: the only one with the note) if they left it
    running; a record that cannot be written is one line, not the launcher's error (the ranks' failure stays it)."""
    named = agent_notes.read(notes, agent_notes.RECORD).strip()
    if not named:
        return
    error = RuntimeError(f"{how}, and its launcher ended the ranks before the run recorded its end")
    method = method_for_stage(run_record.read_record(Path(named)).get("stage"))
    try:
        run_record.end_unended(Path(named), started_ns, error, method.records if method is not None else ())
    except OSError as unwritten:
        print(line(f"the run record {named} was not ended ({unwritten})"), file=sys.stderr, flush=True)
