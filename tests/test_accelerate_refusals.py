"""What the recipe and the accelerate config decide is refused by ``accelerate launch`` itself,
before it starts a rank (patches/.../accelerate_launch.py), as ``llamafactory-cli train`` before torchrun.

Before, each case started both ranks, each printed the refusal, then accelerate printed torch's ``ChildFailedError``
traceback (44 lines). One case (:data:`LAUNCHED`) runs the real ``accelerate launch --config_file`` of
LLaMA-Factory's launcher.py on two CPU ranks (no FSDP shim: nothing should start) and asserts: exit code 1, the
refusal as the last line of at most two (the plugin's hint line, then the error), no traceback, and no rank started
(every process a test starts leaves a marker when it is a rank: tests/process_hooks/sitecustomize.py
``HERA_TEST_RANK_MARKER``). The others run the same command's accelerate code in the test's process, patched as the
plugin's start-up hook patches a launching process (:func:`refused_in_process`): the refusal, and no agent started.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest
import yaml
from fsdp_checks import fsdp2_config_file

from conftest import REPO, base_recipe, engines_of, free_port, harc_recipe, offline_env, run_process

ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
SHIPPED = REPO / "recipes" / "accelerate" / "fsdp2_config.yaml"
_FSDP = "ACCELERATE_USE_FSDP=true (FSDP_VERSION={}), set by accelerate launch with an FSDP config"
CASES: dict[str, tuple[str, dict[str, Any], dict[str, Any] | None, str, str]] = {
    # name: (stage, recipe overrides, the test config's fsdp_config overrides (None: the shipped
    # recipes/accelerate/fsdp2_config.yaml), its mixed precision, what the refusal starts with)
    "8-bit under FSDP2": ("hera", {"quantization_bit": 8}, {"fsdp_cpu_ram_efficient_loading": False}, "no",
                          "quantization_bit: 8 under FSDP2 (ACCELERATE_USE_FSDP, set by accelerate launch"),
    "the shipped fsdp2_config.yaml with a 4-bit recipe (N11)": (
        "harc", {"quantization_bit": 4}, None, "bf16", "quantization_bit: 4 under FSDP2 with "
        "fsdp_cpu_ram_efficient_loading: true (FSDP_CPU_RAM_EFFICIENT_LOADING=true, set by accelerate launch)"),
    "FSDP1": ("harc", {}, {"fsdp_version": 1}, "no", _FSDP.format(1) + ": stage: harc is not run under FSDP1"),
    # a stock stage runs it (tests/test_stock_stages_distributed.py), with a warning
    "SHARDED_STATE_DICT": ("hera", {}, {"fsdp_state_dict_type": "SHARDED_STATE_DICT"}, "no",
                           _FSDP.format(2) + ", FSDP_STATE_DICT_TYPE=SHARDED_STATE_DICT: stage: hera would exit 0 with "
                           "no adapter or model saved"),
    "a bf16 config with a 4-bit recipe without bf16: true": (
        "hera", {"quantization_bit": 4}, {"fsdp_cpu_ram_efficient_loading": False}, "bf16",
        "4-bit weights under FSDP2: the codes are stored as torch.float32 and the accelerate config's mixed precision "
        "gathers them as torch.bfloat16"),
    "hera_heads out of range": ("hera", {"hera_heads": ["L0H0", "L99H0"]}, {}, "no", "hera_heads: L99H0 is outside "),
}


LAUNCHED = "the shipped fsdp2_config.yaml with a 4-bit recipe (N11)"  # in a real launch; the others in process


def refused_in_process(arguments: list[str], env: dict[str, str]) -> str:
    """``accelerate launch ARGUMENTS`` in this process with ``env`` as the environment: accelerate's parser and
    ``launch_command`` with its environment preparers wrapped as patches/.../accelerate_launch.py's ``apply`` wraps
    them in a launching process, up to the start of torchrun's agent (not made). The refusal's message; fails when
    the launch is not refused or the agent would start."""
    import torch.distributed.run
    from accelerate.commands import launch

    from llamafactory_hera.runtime.errors import RecipeError
    from llamafactory_hera_patches.accelerate_launch import _PREPARES, checked

    started: list[Any] = []
    args = launch.launch_command_parser().parse_args(arguments)
    wrapped = {name: functools.partial(checked, getattr(launch, name)) for name in _PREPARES}
    with mock.patch.dict(os.environ, env, clear=True), mock.patch.multiple(launch, **wrapped), \
            mock.patch.object(torch.distributed.run, "run", started.append), pytest.raises(RecipeError) as refused:
        launch.launch_command(args)
    assert not started
    return str(refused.value)


def output_lines(proc: Any) -> list[str]:
    """A process's stdout and stderr lines, without LLaMA-Factory's warning of the tests' DISABLE_VERSION_CHECK."""
    return [line for line in (proc.stdout + proc.stderr).rstrip("\n").split("\n")
            if "Version checking has been disabled" not in line]


@pytest.mark.parametrize("case", list(CASES))
def test_refused_before_accelerate_starts_a_rank(case: str, assets: Any, harc_assets: Any, tmp_path: Path) -> None:
    import llamafactory.launcher

    stage, overrides, fsdp_config, mixed_precision, start = CASES[case]
    if stage == "harc":
        recipe = harc_recipe(harc_assets, "llama3", tmp_path / "out", **overrides)
    else:
        recipe = base_recipe(assets, "qwen2_5_vl", tmp_path / "out", **overrides)
        if stage == "sft":
            recipe = {**{k: v for k, v in recipe.items() if not k.startswith("hera_")}, "stage": "sft"}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    config = SHIPPED if fsdp_config is None else fsdp2_config_file(tmp_path, fsdp_config, mixed_precision)
    arguments = ["--config_file", str(config), "--num_processes", "2", "--main_process_port", str(free_port()),
                 llamafactory.launcher.__file__, str(tmp_path / "recipe.yaml")]
    env = offline_env(tmp_path, engines=engines_of(recipe), HERA_TEST_RANK_MARKER=str(tmp_path / "ranks"))
    if case != LAUNCHED:
        assert refused_in_process(arguments, env).startswith(start)
        return
    proc = run_process([ACCELERATE, "launch", *arguments], cwd=tmp_path, timeout=300, env=env)
    lines = output_lines(proc)
    assert proc.returncode == 1 and len(lines) <= 2, "\n".join(lines)
    assert lines[-1].startswith(f"[llamafactory-hera] error: {start}"), "\n".join(lines)
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr, proc.stderr
    assert not (tmp_path / "ranks").exists(), f"ranks started: {sorted((tmp_path / 'ranks').iterdir())}"


@pytest.mark.parametrize("script,module,args,argv", [
    ("llamafactory.launcher", True, ["r.yaml", "a=1"], ["r.yaml", "a=1"]),
    ("/x/site-packages/llamafactory/launcher.py", False, ["r.yaml"], ["r.yaml"]),
    ("/usr/bin/llamafactory-cli", False, ["train", "r.yaml"], ["r.yaml"]),
    ("lmf", False, ["webui"], None),
    ("other.module", True, ["r.yaml"], None),
])
def test_the_training_argv_of_a_llamafactory_launch(script: str, module: bool, args: list[str],
                                                    argv: list[str] | None) -> None:
    """What the checks read of a launch the start-up hook took for LLaMA-Factory's training (tests/test_host_only.py:
    which launches it takes)."""
    from llamafactory_hera_patches.accelerate_launch import training_argv

    found = training_argv(SimpleNamespace(training_script=script, training_script_args=args, module=module))
    assert found == (None if argv is None else ["llamafactory-cli", "train", *argv])


CLI = str(Path(sys.executable).with_name("llamafactory-cli"))


@pytest.mark.parametrize(("script", "devices", "refused"), [
    (CLI, 8, True), (CLI, 1, False),
    ("llamafactory.launcher", 8, False), ("/x/site-packages/llamafactory/launcher.py", 8, False),
])
def test_the_cli_form_on_several_devices_is_refused(script: str, devices: int, refused: bool,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """On a node with several devices LLaMA-Factory's CLI starts a torchrun of its own inside every accelerate rank
    (launcher.launch: FORCE_TORCHRUN or more than one device): refused, naming the form that runs."""
    from llamafactory.extras import misc

    from llamafactory_hera.runtime.errors import RecipeError
    from llamafactory_hera_patches.accelerate_launch import _check_cli_form

    monkeypatch.setattr(misc, "get_device_count", lambda: devices)
    monkeypatch.delenv("FORCE_TORCHRUN", raising=False)
    args = SimpleNamespace(training_script=script, training_script_args=["train", "r.yaml"],
                           module=script == "llamafactory.launcher")
    if not refused:
        _check_cli_form(args)
        return
    with pytest.raises(RecipeError, match=r"with 8 visible devices LLaMA-Factory's CLI starts a torchrun of its own "
                                          r"inside every rank; launch `-m llamafactory.launcher RECIPE.yaml`"):
        _check_cli_form(args)
