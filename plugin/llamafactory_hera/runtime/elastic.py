"""An elastic launch (``RDZV_ID``, ``MAX_RESTARTS``: LLaMA-Factory's launcher runs torchrun with a c10d rendezvous)
gets a store of its own for each start of its ranks. Imports nothing heavy.

Why (docs/multinode.md): torch's c10d rendezvous keeps the ranks' store across restarts, so a restarted rank may read
the dead rank's gloo address. ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (torch's switch) gives each round a new store,
at a cost (a port drawn then freed; the store ends with rank 0): set only for a plugin stage whose ranks can restart.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from importlib.metadata import PackageNotFoundError, version

from .errors import RecipeError

SWITCH = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


def restarts_possible(env: Mapping[str, str]) -> bool:
    """Whether LLaMA-Factory's elastic launch can restart the ranks: ``MAX_RESTARTS`` > 0 (its launcher passes it to
    torchrun's ``--max-restarts``, default 0) or an elastic node range (``MIN_NNODES`` < ``MAX_NNODES``: a node joining
    restarts every rank without counting)."""
    restarts = env.get("MAX_RESTARTS") or "0"
    if restarts.isdigit() and int(restarts) > 0:
        return True
    lowest = env.get("MIN_NNODES")
    highest = env.get("MAX_NNODES")
    return lowest is not None and highest is not None and lowest != highest  # the launcher's range needs both


def store_per_start(plugin_stage: bool, env: MutableMapping[str, str] | None = None) -> None:
    """Under ``RDZV_ID`` with restarts possible, a plugin stage's torchrun (started from here) gets :data:`SWITCH` set
    to 1 where unset; RecipeError where the user set another value. A host stage, or a launch that never restarts,
    keeps torch's default (the host as without the plugin)."""
    env = os.environ if env is None else env
    if env.get("RDZV_ID") is None or not plugin_stage or not restarts_possible(env):
        return
    value = env.setdefault(SWITCH, "1")
    if value != "1":  # torch shares the store unless the value is exactly "1"
        raise RecipeError(
            f"{SWITCH}={value} with RDZV_ID={env['RDZV_ID']}: torch {_torch()}'s elastic agent then keeps one store "
            f"across the ranks' restarts (MAX_RESTARTS={env.get('MAX_RESTARTS', '0')}, or a node joining), and "
            "restarted ranks read the previous start's addresses and fail at the process group's start (Gloo "
            f"connectFullMesh failed). Unset {SWITCH} (the plugin then sets it to 1) or set it to 1."
        )


def start_key(env: Mapping[str, str] | None = None) -> str:
    """This start of the ranks, for the plugin's keys in the job's store: torchrun's restart count where its agent's
    store outlives a restart (``TORCHELASTIC_USE_AGENT_STORE``), else "0": the store is new for each start. Not the
    count alone: each node's agent counts its own restarts, and one whose ranks did not fail restarts them for a
    node that did without counting, so the nodes of one start may differ."""
    env = os.environ if env is None else env
    return env.get("TORCHELASTIC_RESTART_COUNT", "0") if env.get("TORCHELASTIC_USE_AGENT_STORE") == "True" else "0"


def _torch() -> str:
    try:
        return version("torch")
    except PackageNotFoundError:
        return "(not installed)"
