"""The start-up hook of the processes tests start (tests/process_hooks/unused_packages.py) hides exactly the packages
their runs do not use: the suite's time relies on it having engaged, and a run that uses an engine must still see it,
whichever start-up hook a test puts first on ``PYTHONPATH``."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ENGINES, EVAL_ONLY, REPO, engines_of, offline_env

NAMES = ("wandb", "sklearn", "nltk", "deepspeed", "bitsandbytes")  # modules; scikit-learn's distribution below
PROBE = ("import importlib.metadata as m, importlib.util as u, json, sys\n"
         "def dist(name):\n"
         "    try:\n        m.version({'sklearn': 'scikit-learn'}.get(name, name))\n"
         "    except m.PackageNotFoundError:\n        return False\n"
         "    return True\n"
         "print(json.dumps({n: [u.find_spec(n) is not None, dist(n)] for n in sys.argv[1:]}))")
HOOKS = {"plain": None, "engine evidence": "engine_evidence", "fsdp on cpu": "fsdp_cpu"}


def _seen(tmp: Path, hook: str | None, **options) -> dict[str, bool]:
    env = offline_env(tmp, **options)
    if hook:  # first on PYTHONPATH, as the tests that use it put it
        env["PYTHONPATH"] = f"{REPO / 'tests' / hook}:{env['PYTHONPATH']}"
    proc = subprocess.run([sys.executable, "-c", PROBE, *NAMES], env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout)
    assert all(spec == dist for spec, dist in found.values()), found  # module and metadata hidden together
    return {name: spec for name, (spec, _) in found.items()}


@pytest.mark.parametrize("hook", list(HOOKS.values()), ids=list(HOOKS))
def test_a_test_process_sees_only_the_packages_its_run_uses(tmp_path: Path, hook: str | None) -> None:
    installed = {name: importlib.util.find_spec(name) is not None for name in NAMES}  # this process sees them all
    assert set(EVAL_ONLY) - {"scikit-learn"} | set(ENGINES) == set(NAMES)
    assert _seen(tmp_path, hook) == dict.fromkeys(NAMES, False)
    assert _seen(tmp_path, hook, eval_extra=True) == {**installed, "deepspeed": False, "bitsandbytes": False}
    assert _seen(tmp_path, hook, engines=ENGINES) == {**installed, "wandb": False, "sklearn": False, "nltk": False}


def test_without_deepspeed_hides_deepspeed_whatever_the_run_uses(tmp_path: Path) -> None:
    found = _seen(tmp_path, "without_deepspeed", engines=ENGINES)
    assert found["deepspeed"] is False and found["wandb"] is False
    assert found["bitsandbytes"] is (importlib.util.find_spec("bitsandbytes") is not None)


def test_the_engines_a_run_uses_are_read_from_its_recipe(tmp_path: Path) -> None:
    assert engines_of({"model_name_or_path": str(tmp_path)}) == ()
    assert engines_of({"deepspeed": "ds_z3_config.json", "quantization_bit": 4}) == ("deepspeed", "bitsandbytes")
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"load_in_4bit": True}}))
    assert engines_of({"model_name_or_path": str(tmp_path)}) == ("bitsandbytes",)  # a checkpoint saved quantized
