"""Fault-injection chains of HeRA runs on two CPU ranks (tests/test_fault_injection.py, its campaign).

A chain is one run stopped by a fault, rerun with ``resume_from_checkpoint: true``, stopped again, ..., until a rerun
ends: N faults cost N + 1 launches. Its first launch (tests/dist_probe.py) runs the uninterrupted reference first,
then the chain's first run, so the reference costs no launch of its own. Each fault is one JSON object the ranks'
start-up hook acts on (tests/fault_injection/sitecustomize.py). Engines: ``ddp`` (torchrun; reruns through
``llamafactory-cli train`` with ``FORCE_TORCHRUN``, as users launch it) and ``fsdp2`` (``accelerate launch`` of
LLaMA-Factory's fsdp2 config through the CPU shim of tests/fsdp_cpu/; reruns through launcher.py, as users launch it).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from fsdp_checks import FSDP_HOOK, fsdp2_config_file

from conftest import CLI, aborted_at_exit, base_recipe, free_port, offline_env, run_process
from llamafactory_hera.runtime.whole_checkpoints import newest_whole
from llamafactory_hera_testing.resume import differences, model_tensors

HOOK = Path(__file__).resolve().parent / "fault_injection"
PROBE = str(Path(__file__).with_name("dist_probe.py"))
STEPS, LAYERS = 5, 2  # optimizer steps of a run; decoder layers of the tiny model
ROWS = "4"  # the teacher's pass keeps and batches 4 rows at a time: 16 images per rank, 4 batches
ERROR = "[llamafactory-hera] error: "


def recipe(assets: Any, out: Path, **keys: Any) -> dict[str, Any]:
    """A HeRA LoRA run of STEPS steps, a whole checkpoint after each (one kept), the teacher's pass before step 1."""
    return base_recipe(assets, "qwen2_5_vl", out, **{
        "per_device_train_batch_size": 4, "max_samples": 32, "max_steps": STEPS, "save_strategy": "steps",
        "save_steps": 1, "save_total_limit": 1, "hera_monitor_steps": 0, "hera_teacher_precompute": "true",
        "overwrite_output_dir": False, **keys})


@dataclass
class Link:
    """One launch of a chain: the fault it was given, what came of it, and what it printed."""

    fault: dict[str, Any] | None
    outcome: str
    code: int
    seconds: float
    printed: str = field(repr=False)
    whole_before: bool = False  # whether the run folder held a whole checkpoint when this launch started


def outcome(proc: subprocess.CompletedProcess, fault: dict[str, Any] | None) -> str:
    """``killed`` (the fault's SIGKILL), ``stopped`` (SIGTERM: exit 0 with the line saying how to resume), ``full``
    (a save failed for lack of space: one named line), ``finished``, ``refused`` (one named line), else ``failed``."""
    printed = proc.stdout + proc.stderr
    # a rank's error comes after torch's "[rankN]: " prefix
    errors = [line[line.index(ERROR):] for line in printed.splitlines() if ERROR in line]
    if "[fault_injection]" in printed and "SIGKILL" in printed and proc.returncode != 0:
        return "killed"
    if proc.returncode == 0 or aborted_at_exit(proc):
        return "stopped" if "SIGTERM: saved the whole checkpoint" in printed else "finished"
    if len(set(errors)) == 1:
        return "full" if errors[0].startswith(ERROR + "disk full") else "refused"
    return "failed"


def launch(engine: str, tmp: Path, runs: list[dict[str, Any]], cache: Path, timeout: int = 400
           ) -> subprocess.CompletedProcess:
    """One launch on two ranks: several runs one after another (tests/dist_probe.py; each run's ``env`` its own) when
    more than one, else the one run as users start it."""
    tmp.mkdir(parents=True, exist_ok=True)
    env = {"PYTHONPATH": os.pathsep.join([str(HOOK), *([str(FSDP_HOOK)] if engine == "fsdp2" else [])]),
           "HERA_TEST_TEACHER_ROWS": ROWS, "LLAMAFACTORY_HERA_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    if engine == "fsdp2":
        env.update(HERA_TEST_FSDP_ON_CPU="1", HERA_TEST_FSDP_EVIDENCE=str(tmp / "fsdp"))
        launcher = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file",
                    str(fsdp2_config_file(tmp))]
    else:
        launcher = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", "--master_addr",
                    "127.0.0.1", "--master_port", str(free_port())]
    if len(runs) > 1:
        (tmp / "runs.json").write_text(json.dumps(runs))
        command = [*launcher, PROBE, str(tmp / "runs.json"), str(tmp / "out.pt")]
    else:
        (tmp / "recipe.yaml").write_text(yaml.safe_dump(runs[0]["recipe"]), encoding="utf-8")
        env.update(runs[0].get("env", {}))
        if engine == "fsdp2":
            import llamafactory.launcher  # lazy: the host's entry point, as `accelerate launch` runs it

            command = [*launcher, llamafactory.launcher.__file__, str(tmp / "recipe.yaml")]
        else:
            command = [CLI, "train", str(tmp / "recipe.yaml")]
            env.update(FORCE_TORCHRUN="1", NNODES="1", NPROC_PER_NODE="2", MASTER_PORT=str(free_port()))
    proc = run_process(command, cwd=tmp, env=offline_env(tmp, **env), timeout=timeout)
    (tmp / "printed.txt").write_text(proc.stdout + proc.stderr, encoding="utf-8")  # for a failure's reader
    return proc


def fault_env(fault: dict[str, Any] | None) -> dict[str, str]:
    return {"HERA_TEST_FAULT": json.dumps(fault)} if fault else {}


def run_chain(engine: str, assets: Any, tmp: Path, faults: list[dict[str, Any] | None]) -> tuple[Path, list[Link]]:
    """The uninterrupted reference and a chain through ``faults`` (one a launch; None: no fault), then reruns until
    one ends (at most two more). Returns (the reference's output folder, the links)."""
    reference, out = tmp / "reference" / "out", tmp / "chain" / "out"
    start = time.perf_counter()
    first = launch(engine, tmp / "link0", [{"recipe": recipe(assets, reference), "env": {}},
                                           {"recipe": recipe(assets, out), "env": fault_env(faults[0])}],
                   tmp / "link0" / "cache", timeout=600)
    links = [Link(faults[0], outcome(first, faults[0]), first.returncode, time.perf_counter() - start,
                  first.stdout + first.stderr)]
    assert (reference / "adapter_model.safetensors").is_file(), links[0].printed[-5000:]
    cache = tmp / "link0" / "cache" / "run1"
    plan = [*faults[1:], None, None]
    for index, fault in enumerate(plan, start=1):
        if links[-1].outcome in ("finished", "failed") or (fault is None and index > len(faults) + 1):
            break
        if links[-1].fault is None or links[-1].fault.get("point") != "precompute":
            cache = tmp / f"link{index}" / "cache"  # a fresh one: the teacher's pass runs again in full
        keys = {"resume_from_checkpoint": True} if links[-1].outcome != "refused" else {"overwrite_output_dir": True}
        whole_before, start = newest_whole(out)[0] is not None, time.perf_counter()
        proc = launch(engine, tmp / f"link{index}", [{"recipe": recipe(assets, out, **keys),
                                                      "env": fault_env(fault)}], cache)
        links.append(Link(fault, outcome(proc, fault), proc.returncode, time.perf_counter() - start,
                          proc.stdout + proc.stderr, whole_before))
    return reference, links


def ended_equal(reference: Path, out: Path) -> list[str]:
    """Where the chain's final adapter and HeRA temperature differ from the reference's (bit for bit: as the resume
    tests hold a resumed run to; tests/llamafactory_hera_testing/resume.py)."""
    if not (out / "adapter_model.safetensors").is_file():
        return ["no final adapter"]
    bad = differences(model_tensors(reference), model_tensors(out))
    temperatures = [json.loads((folder / "hera_state.json").read_text())["log_temperature"]
                    for folder in (reference, out)]
    return bad + (["log_temperature"] if temperatures[0] != temperatures[1] else [])


def random_fault(rng: random.Random, point: str | None = None) -> dict[str, Any]:
    """A SIGKILL at a random point of a launch (of ``point``'s kind when given): in a step's forward or optimizer step
    from the ``step``-th step of the launch on, at a save's file write from its ``save``-th save on, at a whole
    checkpoint's marker or rotation, in the teacher's pass. A point the run does not reach (it ended first) leaves
    the run to finish."""
    point = point or rng.choice(["forward", "optimizer", "write", "marker", "precompute"])
    fault: dict[str, Any] = {"point": point, "rank": rng.randrange(2)}
    if point == "forward":
        fault.update(at=rng.randint(1, LAYERS), step=rng.randint(1, STEPS - 1))
    elif point == "optimizer":
        fault.update(at=1, when=rng.choice(["pre", "post"]), step=rng.randint(1, STEPS - 1))
    elif point == "write":
        fault.update(at=rng.randint(1, 6), when=rng.choice(["before", "torn"]), save=rng.randint(1, STEPS - 2))
    elif point == "marker":
        fault.update(at=rng.randint(1, 2), when=rng.choice(["before", "after", "rotate"]), rank=0)
    else:
        fault.update(at=rng.randint(1, 4), when=rng.choice(["forward", "kept"]))
    return fault


def section_fault(rng: random.Random, section: str, signal: str, rank: int) -> dict[str, Any]:
    """A fault of ``signal`` (tests/fault_injection/: ``sigkill``, ``sigterm``, ``sigusr1``, ``sigstop``) from
    ``rank`` at a random point of ``section`` of a launch: ``load``, ``selection`` (rank 1 only as it begins: rank 0
    scores the heads), ``precompute`` (the teacher's pass), ``directions`` (HARC's), ``step``, ``save`` (a checkpoint's
    file or marker; rank 1 writes only its RNG state), ``final`` (the end-of-run save, which rank 0 alone writes).
    Steps and saves are counted from the launch's first or second, so that a resumed launch reaches them too."""
    kill, fault = signal == "sigkill", {"section": section, "signal": signal, "rank": rank, "at": 1}
    if section == "selection" and rank == 0:
        fault["at"] = rng.randint(1, 5)  # as it begins, or before one of its 4 batches is kept
    elif section == "precompute":
        fault.update(point="precompute", at=rng.randint(1, 4), when=rng.choice(["forward", "kept"]))
    elif section == "step":
        point = rng.choice(["forward", "optimizer"] if kill else ["step", "forward", "optimizer"])
        fault.update(point=point, step=rng.randint(1, 2))
        if point == "forward":
            fault["at"] = rng.randint(1, LAYERS)
        elif point == "optimizer":
            fault["when"] = rng.choice(["pre", "post"])
    elif section == "save":
        whens = ["before", "torn"] if kill else ["before"]
        if rank == 1 or rng.random() < 0.5:
            fault.update(point="write", at=1 if rank else rng.randint(1, 4), when=rng.choice(whens),
                         save=rng.randint(1, 2))
        else:
            fault.update(point="marker", at=rng.randint(1, 2),
                         when=rng.choice(["before", "after", "rotate"] if kill else ["before", "after"]))
    elif section == "final":
        fault.update(rank=0, at=rng.randint(1, 2), when=rng.choice(["before", "torn"] if kill else ["before"]))
    return {"point": section, **fault}
