"""Activation: the .pth hook is lazy, can be switched off, guards the host's shape, and reaches the web UI."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import ModuleType

import pytest

from conftest import CLI, free_port, offline_env

PROBE = ("import sys; print(json.dumps({'finder': any(type(f).__name__ == '_PostImportFinder' for f in sys.meta_path),"
         " 'torch': 'torch' in sys.modules, 'llamafactory': 'llamafactory' in sys.modules}))")


def _probe(tmp_path: Path, **env: str) -> dict[str, bool]:
    out = subprocess.run([sys.executable, "-c", "import json; " + PROBE], env=offline_env(tmp_path, **env),
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_hook_is_installed_lazily_in_every_process(tmp_path: Path) -> None:
    assert _probe(tmp_path) == {"finder": True, "torch": False, "llamafactory": False}


def test_disable_switch_installs_nothing(tmp_path: Path) -> None:
    assert _probe(tmp_path, LLAMAFACTORY_HERA_DISABLE="1")["finder"] is False


def test_stage_patch_is_all_or_nothing_on_an_unknown_host_shape() -> None:
    from llamafactory_hera_patches import stage
    from llamafactory_hera_patches.guard import HostMismatchError

    fake = ModuleType("llamafactory.train.tuner")
    fake._training_function = lambda config: None  # run_sft and get_train_args are missing
    fake._ray_training_function = lambda ray_args, config: None
    before = dict(vars(fake))
    with pytest.raises(HostMismatchError) as info:
        stage.apply(fake)
    message = str(info.value)
    assert "LLaMA-Factory 0.9.5" in message and "lacks get_train_args, run_sft" in message
    assert "LLAMAFACTORY_HERA_DISABLE=1" in message
    assert dict(vars(fake)) == before  # not half-patched


def test_stage_patch_applies_once() -> None:
    import llamafactory.train.tuner as tuner

    patched = tuner._training_function
    from llamafactory_hera_patches import stage

    stage.apply(tuner)
    assert tuner._training_function is patched and tuner._llamafactory_hera_patched


def test_webui_lists_the_hera_stage(tmp_path: Path) -> None:
    port = free_port()
    env = offline_env(tmp_path, GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port),
                      GRADIO_ANALYTICS_ENABLED="False")
    proc = subprocess.Popen([CLI, "webui"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline, config = time.time() + 120, None
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=2) as response:
                    config = response.read().decode()
                break
            except OSError:
                time.sleep(1)
        assert config is not None, proc.stdout.read().decode()[-3000:] if proc.poll() is not None else "no answer"
        assert "HeRA (Head-wise Representation Alignment)" in config and "Supervised Fine-Tuning" in config
    finally:
        proc.terminate()
        proc.wait(timeout=30)
