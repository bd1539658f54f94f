"""The methods this plugin brings to LLaMA-Factory: the registry, above the methods' packages (none of which imports
it). The start-up hook registers :func:`declared_methods` with :mod:`llamafactory_hera_patches.registry`; the patches
make each declaration (:class:`~llamafactory_hera.recipe.declaration.Method`) a stage, an argument set and a LlamaBoard
panel, and ``llamafactory-hera`` takes its verbs from it, so adding a method touches no patch. Declarations import only
each method's ``config``; the heavy parts are ``"module:attribute"`` strings.
"""

from __future__ import annotations

import functools
from typing import Any

from llamafactory_hera.harc import config as harc
from llamafactory_hera.hera import config as hera
from llamafactory_hera.recipe.declaration import Method


def _declared(stage: str, label: str, **declared: Any) -> Method:
    """A method whose package ``llamafactory_hera.<stage>`` has the layout every method here has: ``config.py``
    parses its ``<stage>_*`` keys (``parse_<stage>_arguments``), ``checks.py`` checks the host's arguments,
    ``workflow.py`` runs it (``run_<stage>``) as an extension of LLaMA-Factory's ``sft``, ``webui_panel.py`` declares
    its LlamaBoard panel; ``declared``: the rest of its :class:`Method`."""
    package = f"llamafactory_hera.{stage}"
    return Method(stage=stage, label=label, prefix=f"{stage}_", host_stage="sft",
                  parse_arguments=f"{package}.config:parse_{stage}_arguments",
                  check_raw_host_args=f"{package}.checks:validate_raw_host_args",
                  check_host_args=f"{package}.checks:validate_host_args", run=f"{package}.workflow:run_{stage}",
                  panel=f"{package}.webui_panel:PANEL", **declared)


HERA = _declared("hera", "HeRA (Head-wise Representation Alignment)", log_keys=hera.LOG_KEYS,
                 add_cli_verbs="llamafactory_hera.hera.cli:add_verbs", records=("hera_run.json",))
RAH = _declared("rah", "RAH-LoRA (training-free head calibration)", log_keys=(), records=("rah_profile.json",),
                one_process=True)
HARC = _declared("harc", "HARC (harmfulness-refusal coupling)", log_keys=harc.LOG_KEYS,
                 add_cli_verbs="llamafactory_hera.harc.convert:add_verbs", records=("harc_run.json",))

# every declared method, in the order the web UI lists them
DECLARATIONS: tuple[Method, ...] = (HERA, RAH, HARC)


@functools.cache
def declared_methods() -> tuple[Method, ...]:
    """Every declared method, checked once: no two share a stage or a key prefix."""
    stages = [method.stage for method in DECLARATIONS]
    prefixes = [method.prefix for method in DECLARATIONS]
    if len(set(stages)) != len(stages) or len(set(prefixes)) != len(prefixes):
        raise RuntimeError(f"llamafactory-hera: two declared methods share a stage or a key prefix: {stages}, "
                           f"{prefixes}")
    return DECLARATIONS
