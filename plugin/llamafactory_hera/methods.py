"""The plugin's methods: the registry, above the methods' packages (none imports it). The start-up hook registers
:func:`declared_methods` with :mod:`llamafactory_hera.runtime.registry`; the patches make each
:class:`~llamafactory_hera.recipe.declaration.Method` a stage, arguments and a LlamaBoard panel, and
``llamafactory-hera`` takes its verbs: a new method touches no patch.

A declaration names its parts as module strings, each imported only when used (gradio, torch, the verbs' and plan's
modules: a training run or a one-line error needs none).
"""

from __future__ import annotations

import functools

from llamafactory_hera.harc import config as harc
from llamafactory_hera.hera import config as hera
from llamafactory_hera.rah import config as rah
from llamafactory_hera.recipe.declaration import Method, declared_function, declared_value

# every method's run planned alike
PLAN = declared_function("llamafactory_hera.plan.cli:board_report")

HERA = Method(
    stage="hera",
    label="HeRA (Head-wise Representation Alignment)",
    prefix="hera_",
    host_stage="sft",
    arguments=hera.HeraArguments,
    parse=hera.parse_hera_arguments,
    check_raw="llamafactory_hera.hera.raw_checks:validate_raw_host_args",
    check_parsed="llamafactory_hera.hera.parsed_checks:validate_host_args",
    prepare="llamafactory_hera.hera.preparation:prepare",
    train="llamafactory_hera.hera.workflow:train",
    finish="llamafactory_hera.hera.workflow:finish",
    save_signal_key="hera_save_on_signal",
    watchdog_key="hera_watchdog_timeout",
    log_keys=hera.LOG_KEYS,
    panel=declared_value("llamafactory_hera.hera.webui_panel:PANEL"),
    plan=PLAN,
    add_cli_verbs=declared_function("llamafactory_hera.hera.cli:add_verbs"),
    records=("hera_run.json",),
)

RAH = Method(
    stage="rah",
    label="RAH-LoRA (training-free head calibration)",
    prefix="rah_",
    host_stage="sft",
    arguments=rah.RahArguments,
    parse=rah.parse_rah_arguments,
    check_raw="llamafactory_hera.rah.raw_checks:validate_raw_host_args",
    check_parsed="llamafactory_hera.rah.parsed_checks:validate_host_args",
    prepare="llamafactory_hera.rah.workflow:prepare",
    train="llamafactory_hera.rah.workflow:train",
    finish="llamafactory_hera.rah.workflow:finish",
    panel=declared_value("llamafactory_hera.rah.webui_panel:PANEL"),
    plan=PLAN,
    records=("rah_profile.json",),
    one_process=True,
)

HARC = Method(
    stage="harc",
    label="HARC (harmfulness-refusal coupling)",
    prefix="harc_",
    host_stage="sft",
    arguments=harc.HarcArguments,
    parse=harc.parse_harc_arguments,
    check_raw="llamafactory_hera.harc.raw_checks:validate_raw_host_args",
    check_parsed="llamafactory_hera.harc.parsed_checks:validate_host_args",
    prepare="llamafactory_hera.harc.workflow:prepare",
    train="llamafactory_hera.harc.workflow:train",
    save_signal_key="harc_save_on_signal",
    watchdog_key="harc_watchdog_timeout",
    log_keys=harc.LOG_KEYS,
    panel=declared_value("llamafactory_hera.harc.webui_panel:PANEL"),
    plan=PLAN,
    add_cli_verbs=declared_function("llamafactory_hera.harc.convert:add_verbs"),
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
