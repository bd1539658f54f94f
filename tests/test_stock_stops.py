"""A stock run (``stage: sft``, no key of the plugin's) on two gloo ranks, stopped from outside mid-training, leaves
and prints what it does without the plugin (``LLAMAFACTORY_HERA_DISABLE=1``: the start-up hook does nothing, as
uninstalled): no claim, watchdog folder or run record in its output_dir, no line of the plugin's, and neither its
ranks nor its launcher print a line the stock ones do not. The plugin starts none of those in a stock run: a claim
outlived a SIGUSR1 or SIGKILL (released only at exit or on SIGTERM), the refusal watcher's poll of torchrun's store
printed c10d's ``recvValue failed`` and a C++ frame dump on each rank once the agent was gone, and the launcher's check
before torchrun ran v0's version checks (their 'Version checking has been disabled' line), left to the ranks by stock.

The stops (tests/fault_injection/, both arms alike), each as the optimizer step 3 of rank 0 begins (checkpoint-2 is
whole on both ranks then: the step's backward all-reduce came after their saves): a scheduler's SIGUSR1 to every
process of a ``llamafactory-cli train`` launch (its default ends each), and torchrun's agent SIGKILLed alone, the
ranks running on for 2 s, then SIGKILL to them (a node lost, an out-of-memory kill). Each rank's output is read from
its own file (torchrun's ``--log-dir`` / ``--redirects``, set through ``PET_*``): the two ranks never share a line.

Why real launches: what is tested is processes ending by signals (the launcher, torchrun's agent, the ranks), which
a warm launch (tests/warm_launch.py, the agent being its warm process) does not have; a stop ends its launch, so it
cannot share one with the runs of tests/test_stock_stages_distributed.py. The agent's stop runs a bare ``torchrun``
of LLaMA-Factory's launcher.py (what ``llamafactory-cli train`` starts), one process less.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from faults import HOOK

from conftest import CLI, base_recipe, free_port, offline_env, processes_marked, run_process

STOPS = {"sigusr1": {"signal": "SIGUSR1"}, "agent": {"agent_first": 2}}
PLUGIN = ("llamafactory-hera", "llamafactory_hera")


def _launch(assets: Any, tmp: Path, stop: str, disabled: bool) -> dict[str, Any]:
    """One stopped run into ``tmp/out``: its exit code, the files it left, what each process printed."""
    import llamafactory.launcher

    out = tmp / "out"
    recipe = {k: v for k, v in base_recipe(assets, "qwen2_5_vl", out, per_device_train_batch_size=4, max_samples=16,
                                           max_steps=4, save_strategy="steps", save_steps=2).items()
              if not k.startswith("hera_")} | {"stage": "sft"}
    tmp.mkdir(parents=True)
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    fault = {"point": "optimizer", "when": "pre", "at": 3, "rank": 0, **STOPS[stop]}
    env = {"PYTHONPATH": str(HOOK), "HERA_TEST_FAULT": json.dumps(fault), "PET_LOG_DIR": str(tmp / "ranks"),
           "PET_REDIRECTS": "3", "PYTHONHASHSEED": "0",  # LLaMA-Factory prints a set (its LoRA targets)
           **({"LLAMAFACTORY_HERA_DISABLE": "1"} if disabled else {})}
    port = str(free_port())
    if stop == "sigusr1":  # as users launch it: the scheduler signals llamafactory-cli too
        env |= {"FORCE_TORCHRUN": "1", "NNODES": "1", "NPROC_PER_NODE": "2", "MASTER_PORT": port}
        command = [CLI, "train", str(tmp / "recipe.yaml")]
    else:
        command = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", "--master_addr",
                   "127.0.0.1", "--master_port", port, llamafactory.launcher.__file__, str(tmp / "recipe.yaml")]
    proc = run_process(command, cwd=tmp, env=offline_env(tmp, **env, HERA_TEST_STOPPED=str(tmp)), timeout=400)
    _ended(str(tmp))
    ranks = {}
    for rank in (0, 1):
        found = list((tmp / "ranks").glob(f"*/attempt_0/{rank}"))
        assert len(found) == 1, found
        ranks[rank] = "".join((found[0] / name).read_text(encoding="utf-8") for name in ("stdout.log", "stderr.log"))
    for name, text in (("launcher", proc.stdout + proc.stderr), *((f"rank{r}", t) for r, t in ranks.items())):
        (tmp / f"{name}.txt").write_text(text, encoding="utf-8")  # for a failure's reader
    return {"code": proc.returncode, "files": {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()},
            "launcher": proc.stdout + proc.stderr, "ranks": ranks, "tmp": tmp}


def _ended(mark: str, timeout: float = 60) -> None:
    """Until the launch's ranks have ended: their output goes to files, so the launch's pipes may close first."""
    import psutil

    deadline = time.monotonic() + timeout
    while (left := processes_marked("HERA_TEST_STOPPED", mark)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for process in left:
        with contextlib.suppress(psutil.Error):
            process.kill()
    assert not left, f"{len(left)} processes of the launch still ran {timeout:.0f} s after it"


def _lines(text: str, tmp: Path) -> set[str]:
    """Each line, its folder, numbers and times made alike; not a progress bar's (which states it shows is timing)."""
    text = text.replace(str(tmp), "<run>")
    return {re.sub(r"\d+", "0", line).strip() for line in re.split(r"[\r\n]", text) if "%|" not in line} - {""}


@pytest.mark.parametrize("stop", ["sigusr1", "agent"])
def test_a_stopped_stock_run_leaves_and_prints_what_it_does_without_the_plugin(stop: str, assets,
                                                                              tmp_path: Path) -> None:
    live, off = (_launch(assets, tmp_path / arm, stop, arm == "off") for arm in ("live", "off"))
    for run in (live, off):  # stopped in step 3: checkpoint-2, no final save
        said = f"[fault_injection] rank 0: {STOPS[stop].get('signal', 'SIGKILL')} in optimizer step 3 (pre its update)"
        assert said in run["ranks"][0], run["ranks"][0][-3000:]
        assert "checkpoint-2/adapter_model.safetensors" in run["files"] and "adapter_model.safetensors" not in run[
            "files"], sorted(run["files"])
    assert live["code"] == off["code"]
    assert live["files"] == off["files"] and not [f for f in live["files"] if "llamafactory_hera" in f]
    for name, text in (("launcher", live["launcher"]), *((f"rank {r}", t) for r, t in live["ranks"].items())):
        assert not [line for line in text.splitlines() if any(mark in line for mark in PLUGIN)], name
    for rank in (0, 1):
        extra = _lines(live["ranks"][rank], live["tmp"]) - _lines(off["ranks"][rank], off["tmp"])
        assert not extra, (rank, sorted(extra))
    extra = _lines(live["launcher"], live["tmp"]) - _lines(off["launcher"], off["tmp"])
    assert not extra, sorted(extra)
