"""Two-rank FSDP2 runs on CPU under ``accelerate launch --config_file <fsdp2 config>`` (LLaMA-Factory's
examples/accelerate/fsdp2_config.yaml with ``mixed_precision: 'no'``), through the test-only shim in tests/fsdp_cpu/
(accelerate 1.11 would train plain DDP on CPU), and what each rank recorded: one run as users start it
(:func:`accelerate_launch`, LLaMA-Factory's launcher.py), or several one after another in one launch
(:func:`accelerate_launch_runs`, tests/dist_probe.py)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

from conftest import engines_of, free_port, offline_env, run_once_more_if_aborted_at_exit

FSDP_HOOK = Path(__file__).resolve().parent / "fsdp_cpu"
FSDP2_CONFIG = {  # examples/accelerate/fsdp2_config.yaml of LLaMA-Factory, on the CPU
    "compute_environment": "LOCAL_MACHINE", "debug": False, "distributed_type": "FSDP", "downcast_bf16": "no",
    "fsdp_config": {"fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "fsdp_cpu_ram_efficient_loading": True,
                    "fsdp_offload_params": False, "fsdp_reshard_after_forward": True,
                    "fsdp_state_dict_type": "FULL_STATE_DICT", "fsdp_version": 2},
    "machine_rank": 0, "main_training_function": "main", "mixed_precision": "no", "num_machines": 1,
    "num_processes": 2, "rdzv_backend": "static", "same_network": True, "use_cpu": True,
}


def fsdp2_config_file(tmp: Path, fsdp_config: dict[str, Any] | None = None, mixed_precision: str = "no") -> Path:
    """:data:`FSDP2_CONFIG` (its ``fsdp_config`` updated with ``fsdp_config``, its ``mixed_precision``, a free port)
    written into ``tmp``."""
    config = {**FSDP2_CONFIG, "fsdp_config": {**FSDP2_CONFIG["fsdp_config"], **(fsdp_config or {})},
              "mixed_precision": mixed_precision, "main_process_port": free_port()}
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "fsdp2_config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    return tmp / "fsdp2_config.yaml"


def _launch(config: Path, tmp: Path) -> tuple[list[str], dict[str, str]]:
    """The ``accelerate launch --config_file config`` command's start and the environment that puts the shim's
    start-up hook (tests/fsdp_cpu/) on the ranks' path, its evidence in ``tmp/fsdp``."""
    command = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file", str(config)]
    return command, {"PYTHONPATH": os.pathsep.join(filter(None, [str(FSDP_HOOK), os.environ.get("PYTHONPATH")])),
                     "HERA_TEST_FSDP_EVIDENCE": str(tmp / "fsdp")}


def fsdp_run(recipe: dict[str, Any], tmp: Path, shim: bool = True, **fsdp_env: str) -> dict[str, Any]:
    """One run of :func:`accelerate_launch_runs`: under FSDP2 with ``shim``, else as accelerate 1.11 runs the config
    on CPU (plain DDP); each rank's evidence in ``tmp/fsdp``. ``fsdp_env``: the config's settings for this run, as
    accelerate launch hands them to the ranks (e.g. ``FSDP_OFFLOAD_PARAMS="true"``)."""
    return {"recipe": recipe, "env": {"HERA_TEST_FSDP_EVIDENCE": str(tmp / "fsdp"),
                                      "HERA_TEST_FSDP_ON_CPU": "1" if shim else "", **fsdp_env}}


def accelerate_launch_runs(runs: list[dict[str, Any]], tmp: Path, fsdp_config: dict[str, Any] | None = None,
                           mixed_precision: str = "no", config: Path | None = None) -> list[dict[str, Any]]:
    """:func:`fsdp_run` runs one after another in one ``accelerate launch --config_file`` of :data:`FSDP2_CONFIG` (its
    ``fsdp_config`` updated with ``fsdp_config``, its ``mixed_precision``; or ``config``, a file) on two ranks
    (tests/dist_runs.py; tests/dist_probe.py in the place of LLaMA-Factory's launcher.py, which calls the same
    run_exp), forked from the warm process with the variables accelerate gives its ranks (tests/warm_launch.py). The
    shim and the evidence are switched per run. :func:`accelerate_launch` is the real launch, for the tests that hold
    its user path."""
    from dist_runs import launch_runs  # lazy: dist_runs imports torch, which this module's importers need not

    launcher, env = _launch(config or fsdp2_config_file(tmp, fsdp_config, mixed_precision), tmp)
    return launch_runs(runs, tmp, 2, env=env, launcher=launcher)


def accelerate_launch(recipe: dict[str, Any], tmp: Path, shim: bool = True, timeout: int = 900,
                      fsdp_config: dict[str, Any] | None = None, mixed_precision: str = "no") -> Any:
    """``accelerate launch`` of ``recipe`` on two ranks with :data:`FSDP2_CONFIG` (its ``fsdp_config`` updated with
    ``fsdp_config``, its ``mixed_precision``); with ``shim`` under FSDP2, without it as accelerate 1.11 runs the config
    on CPU: plain DDP (each rank's evidence in ``tmp/fsdp`` either way). A failed run raises AssertionError."""
    import llamafactory.launcher  # lazy: the host's entry point, as `accelerate launch src/train.py` runs it

    config = fsdp2_config_file(tmp, fsdp_config, mixed_precision)
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    launcher, env = _launch(config, tmp)
    if shim:
        env["HERA_TEST_FSDP_ON_CPU"] = "1"
    command = [*launcher, llamafactory.launcher.__file__, str(tmp / "recipe.yaml")]
    proc = run_once_more_if_aborted_at_exit(
        command, dict(cwd=tmp, env=offline_env(tmp, engines=engines_of(recipe), **env), timeout=timeout),
        lambda: (shutil.rmtree(recipe["output_dir"], ignore_errors=True), shutil.rmtree(tmp / "fsdp",
                                                                                          ignore_errors=True)))
    if proc.returncode != 0:
        raise AssertionError(f"accelerate launch failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-8000:]}")
    return proc


def read_fsdp_evidence(tmp: Path) -> list[dict[str, Any]]:
    """Both ranks' records (tests/fsdp_cpu/sitecustomize.py) of the run in ``tmp``."""
    records = []
    for rank in (0, 1):
        path = tmp / "fsdp" / f"rank{rank}.jsonl"
        assert path.is_file(), f"no FSDP evidence of rank {rank}: {path}"
        records += [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return records


def assert_fsdp2(tmp: Path, events: set[str]) -> list[dict[str, Any]]:
    """Both ranks ran under FSDP2 at every recorded event (``events`` among step, save, load all seen): FSDP on
    AcceleratorState and PartialState, every trainable parameter and o_proj's weight a DTensor holding half of the
    rows. Returns the records."""
    records = read_fsdp_evidence(tmp)
    assert events <= {record["event"] for record in records}, records
    for record in records:
        assert record["distributed_type"] == record["partial_distributed_type"] == "DistributedType.FSDP", record
        assert record["fsdp_version"] == 2 and record["is_fsdp_enabled"], record
        assert record["trainable"] > 0 and record["trainable_dtensors"] == record["trainable"], record
        assert record["o_proj_dtensor"] and record["o_proj_local"][0] * 2 == record["o_proj_full"][0], record
    return records
