"""The plugin's methods: the registry, above the methods' packages (none imports it). The start-up hook registers
:func:`declared_methods` with :mod:`llamafactory_hera.runtime.registry`; the patches make each
:class:`~llamafactory_hera.recipe.declaration.Method` a stage, arguments and a LlamaBoard panel, and
``llamafactory-hera`` takes its verbs: a new method touches no patch.

A declaration names its (light) run class; its panel, verbs and plan are the functions below, each importing what it
builds only when called (gradio, torch, the verbs' and plan's modules: a training run or a one-line error needs none).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from llamafactory_hera.harc import config as harc
from llamafactory_hera.harc.run import HarcRun
from llamafactory_hera.hera import config as hera
from llamafactory_hera.hera.run import HeraRun
from llamafactory_hera.rah.run import RahRun
from llamafactory_hera.recipe.declaration import Method


def plan(args: dict[str, Any]) -> str:
    """Every method's run planned alike (:func:`llamafactory_hera.plan.cli.board_report`)."""
    from llamafactory_hera.plan.cli import board_report  # lazy

    return board_report(args)


def hera_panel() -> Any:
    from llamafactory_hera.hera.webui_panel import PANEL  # lazy

    return PANEL


def rah_panel() -> Any:
    from llamafactory_hera.rah.webui_panel import PANEL  # lazy

    return PANEL


def harc_panel() -> Any:
    from llamafactory_hera.harc.webui_panel import PANEL  # lazy

    return PANEL


def hera_verbs(commands: Any) -> dict[str, Callable[[Any], None]]:
    from llamafactory_hera.hera.cli import add_verbs  # lazy

    return add_verbs(commands)


def harc_verbs(commands: Any) -> dict[str, Callable[[Any], None]]:
    from llamafactory_hera.harc.convert import add_verbs  # lazy

    return add_verbs(commands)


HERA = Method(
    stage="hera",
    label="HeRA (Head-wise Representation Alignment)",
    prefix="hera_",
    host_stage="sft",
    run=HeraRun,
    log_keys=hera.LOG_KEYS,
    panel=hera_panel,
    plan=plan,
    add_cli_verbs=hera_verbs,
    records=("hera_run.json",),
)

RAH = Method(
    stage="rah",
    label="RAH-LoRA (training-free head calibration)",
    prefix="rah_",
    host_stage="sft",
    run=RahRun,
    panel=rah_panel,
    plan=plan,
    records=("rah_profile.json",),
    one_process=True,
)

HARC = Method(
    stage="harc",
    label="HARC (harmfulness-refusal coupling)",
    prefix="harc_",
    host_stage="sft",
    run=HarcRun,
    log_keys=harc.LOG_KEYS,
    panel=harc_panel,
    plan=plan,
    add_cli_verbs=harc_verbs,
    records=("harc_run.json",),
)

# every declared method, in the order the web UI lists them
DECLARATIONS: tuple[Method, ...] = (HERA, RAH, HARC)


@functools.cache
def declared_methods() -> tuple[Method, ...]:
    """Every declared method, checked once: no two share a stage or a key prefix."""
    stages = [method.stage for method in DECLARATIONS]
    prefixes = [method.prefix for method in DECLARATIONS]
    if len(set(stages)) != len(stages) or len(set(prefixes)) != len(prefixes):
        raise RuntimeError(
            f"llamafactory-hera: two declared methods share a stage or a key prefix: {stages}, {prefixes}"
        )
    return DECLARATIONS
