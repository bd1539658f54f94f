"""The plugin's environment variables are parsed as strictly as a recipe key (runtime/env_knobs.py): a unit, 0, a
negative or a word neither on nor off is one line naming the variable, its value and the fix, raised before the host
parses the recipe (the launcher's checks and every rank's). Before, ``LLAMAFACTORY_HERA_START_TIMEOUT=0`` ended a
healthy two-rank launch blaming the store, ``-5`` was taken and ``10m`` was silently 600 s. The host's switches are
read as LLaMA-Factory reads them (``USE_MCA=y`` is on). No model, no run."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import harc_recipe, run_train
from llamafactory_hera import _bootstrap, job_refusal
from llamafactory_hera.runtime import env_knobs, job_store
from llamafactory_hera.runtime.errors import RecipeError
from llamafactory_hera_patches import backends
from llamafactory_hera_patches.recipe import raw_checks

START = env_knobs.START_TIMEOUT
BOUND_FIX = ("(the time a launch's nodes have to join and its ranks to start): set it to seconds without a unit, e.g. "
             "600 for 10 minutes, or unset it for 600 s.")


@pytest.mark.parametrize(("value", "said"), [
    *((value, "is not a number of seconds") for value in ("10m", "600s", "ten", "inf", "nan")),
    *((value, "must be above 0 seconds") for value in ("0", "-5", "0.0")),
])
def test_a_start_bound_not_above_0_seconds_is_one_line(value: str, said: str) -> None:
    with pytest.raises(RecipeError) as raised:
        env_knobs.seconds(START, {START: value})
    assert str(raised.value) == f"{START}={value} {said} {BOUND_FIX}"
    with pytest.raises(RecipeError, match=f"^{START}="):
        job_store.start_bound({START: value})  # what the launch watch and the watchdog read


def test_a_start_bound_in_seconds_is_taken_and_unset_is_600() -> None:
    assert env_knobs.seconds(START, {START: "7.5"}) == job_store.start_bound({START: " 90 "}) - 82.5 == 7.5
    assert env_knobs.seconds(START, {}) == env_knobs.seconds(START, {START: ""}) == job_store.start_bound({}) == 600


@pytest.mark.parametrize("name", list(env_knobs.SWITCHES))
def test_each_switch_takes_on_and_off_and_refuses_anything_else(name: str) -> None:
    for value in ("1", "true", "YES", " y ", "On"):
        assert env_knobs.switch(name, {name: value}), value
    for value in ("0", "false", "No", "n", "off", ""):
        assert not env_knobs.switch(name, {name: value}), value
    assert not env_knobs.switch(name, {})
    for value in ("2", "enabled", "-1"):
        with pytest.raises(RecipeError) as raised:
            env_knobs.switch(name, {name: value})
        assert str(raised.value) == (
            f"{name}={value} is neither on nor off: set it to 1 (or true, yes, y, on) if the plugin "
            f"{env_knobs.SWITCHES[name]}, or to 0 (false, no, n, off) or unset it if not.")


def test_the_start_up_hook_turns_the_plugin_off_on_the_parsers_on_values() -> None:
    """The hook reads ``LLAMAFACTORY_HERA_DISABLE`` itself (it imports nothing of the plugin): off on exactly the
    parser's on values, on for the others (which the checks refuse)."""
    assert _bootstrap.DISABLE_ENV == env_knobs.DISABLE and _bootstrap.DISABLE_ON == env_knobs.ON


def test_a_traceback_switch_neither_on_nor_off_keeps_the_short_reports(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its own refusal (by the checks) is then printed as one line, as every other."""
    for value, installed in (("maybe", True), ("1", False), ("0", True)):
        monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
        monkeypatch.setenv(env_knobs.TRACEBACK, value)
        job_refusal.install()
        assert (sys.excepthook is not sys.__excepthook__) == installed, value


def test_the_checks_refuse_a_wrong_variable_before_the_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every rank's and the launcher's checks (a method's run, a host stage); not ``plan``'s (no machine)."""
    monkeypatch.setenv(START, "0")
    with pytest.raises(RecipeError, match=f"^{START}=0 must be above 0 seconds"):
        raw_checks.checked_run(None, {}, {})  # before the method is read
    with pytest.raises(AttributeError):
        raw_checks.checked_run(None, {}, {}, machine=False)  # not checked: on to the method (None here)
    with pytest.raises(RecipeError, match=f"^{START}=0 "):
        raw_checks.check_host_stage({"stage": "sft"}, {START: "0"})
    from llamafactory_hera_patches.launch import check_before_ranks

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"stage": "sft", "do_train": True, "output_dir": str(tmp_path / "out")}))
    monkeypatch.setenv(START, "10m")
    with pytest.raises(RecipeError, match=f"^{START}=10m is not a number of seconds"):
        check_before_ranks(["llamafactory-cli", "train", str(recipe)])
    monkeypatch.delenv(START)
    monkeypatch.setenv(env_knobs.DISABLE, "please")
    with pytest.raises(RecipeError, match=f"^{env_knobs.DISABLE}=please is neither on nor off"):
        check_before_ranks(["llamafactory-cli", "train", str(recipe)])


@pytest.mark.parametrize("value", ["y", "Y", "1", "true", "True", "yes", "on", " 1", "0", "", "n"])
def test_use_mca_is_on_where_llamafactory_reads_it_on(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``USE_MCA=y`` is on for LLaMA-Factory (``is_env_enabled``): the plugin refuses its stages there and starts
    torchrun as the host does; ``yes`` and `` 1`` are off for both."""
    from llamafactory.extras.misc import is_env_enabled

    monkeypatch.setenv("USE_MCA", value)
    assert backends.forced_torchrun({"USE_MCA": value}) == is_env_enabled("USE_MCA"), value
    refused = backends.refusal("hera", {}, {"USE_MCA": value})
    assert (refused is not None) == is_env_enabled("USE_MCA"), value
    assert refused is None or refused.startswith(f"stage: hera cannot run with USE_MCA={value} ")


def test_a_start_bound_of_0_is_one_line_before_torchrun_starts(harc_assets: Any, tmp_path: Path) -> None:
    """``FORCE_TORCHRUN=1 NPROC_PER_NODE=2`` with ``LLAMAFACTORY_HERA_START_TIMEOUT=0``: before, the launch watch
    ended the healthy launch at once and blamed the store or a firewall; now the launcher's line, and no rank starts."""
    env = {"FORCE_TORCHRUN": "1", "NNODES": "1", "NPROC_PER_NODE": "2", START: "0"}
    proc = run_train(harc_recipe(harc_assets, "llama3", tmp_path / "out", max_steps=1), tmp_path, check=False, env=env)
    lines = (proc.stdout + proc.stderr).rstrip("\n").split("\n")
    assert proc.returncode == 1 and len(lines) <= 4, "\n".join(lines)
    assert lines[-1] == f"[llamafactory-hera] error: {START}=0 must be above 0 seconds {BOUND_FIX}", "\n".join(lines)
    assert not any("Traceback" in line or "distributed tasks" in line for line in lines), "\n".join(lines)
