"""The summary a demo prints after its run, and the lines the demos' next steps share."""

from __future__ import annotations

import importlib.util
import json
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llamafactory_hera.demo.runner import DemoContext
from llamafactory_hera.evaluation.cli import EXTRA_PACKAGES


def read_log(run_dir: Path) -> list[dict[str, Any]]:
    """``trainer_log.jsonl``'s lines (empty if missing)."""
    path = run_dir / "trainer_log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def first_last(log: list[dict[str, Any]], key: str) -> str:
    """``first -> last  (n logged steps)`` of ``key``, or ``not logged``."""
    values = [entry[key] for entry in log if key in entry]
    if not values:
        return "not logged"
    return f"{values[0]:.4f} -> {values[-1]:.4f}  ({len(values)} logged steps)"


def where(run_dir: Path, name: str, what: str) -> str:
    """A summary line: what an output is and its path, ``(missing)`` if the run did not write it."""
    path = run_dir / name
    return f"  {what:<34} {path}{'' if path.exists() else '  (missing)'}"


def command(*parts: str | Path) -> str:
    """A command line indented under its step, quoted to be pasted."""
    return "     " + shlex.join([str(part) for part in parts])


def eval_extra_lines() -> list[str]:
    """The line installing the ``eval`` extra when lmms-eval or lm-eval is missing (the demo installs only its own)."""
    if all(importlib.util.find_spec(module) for module in ("lmms_eval", "lm_eval")):
        return []
    return [
        "     (once, the eval extra's libraries: "
        + shlex.join([sys.executable, "-m", "pip", "install", *EXTRA_PACKAGES])
        + ")"
    ]


def chat_command(ctx: DemoContext, model: str | Path, template: str, *extra: str) -> str:
    """``llamafactory-cli chat`` with the run's adapter on ``model``, greedy (sampling prints noise), then ``extra``."""
    return command(
        ctx.cli,
        "chat",
        "--model_name_or_path",
        model,
        "--adapter_name_or_path",
        ctx.run_dir,
        "--template",
        template,
        "--do_sample",
        "false",
        *extra,
    )


def eval_base_lines(ctx: DemoContext, tasks: str = "demo") -> list[str]:
    """``llamafactory-hera eval`` of the run against its base model, and the eval extra's install line if missing."""
    return [command(ctx.hera_cli, "eval", ctx.run_dir, "--base", "--tasks", tasks), *eval_extra_lines()]


def summary_text(
    ctx: DemoContext,
    title: str,
    elapsed: float,
    outputs: Sequence[tuple[str, str]],
    paths: Mapping[str, Path],
    figures: Sequence[str],
    next_steps: Sequence[str],
    plots: bool = True,
) -> str:
    """A finished run's summary: ``outputs`` (name in the run's folder, what it is), ``paths`` (what it is -> a path
    outside it), ``next_steps`` (heading, steps)."""
    run_dir = ctx.run_dir
    pngs = sorted(run_dir.glob("*.png"))
    return "\n".join(
        [
            "",
            f"{title} demo finished in {elapsed:.1f}s. Outputs in {run_dir}:",
            *[where(run_dir, name, what) for name, what in outputs],
            *[f"  {what:<34} {path}" for what, path in paths.items()],
            *([f"Plots ({len(pngs)}):", *[f"  {path}" for path in pngs]] if plots else []),
            "",
            *figures,
            "",
            *next_steps,
        ]
    )
