"""Run recipes one after another through LLaMA-Factory's run_exp (under torchrun or not) and dump, per run, rank 0's
first-step o_proj gradients and training logs.

Usage: [torchrun --nproc_per_node N] dist_probe.py RUNS.json OUT.pt
RUNS.json: a list of runs, each {"recipe": {...}, "env": {...}}: ``env`` is set for that run only (e.g. the folder of
its engine evidence, tests/engine_evidence/, which each rank writes at its run's first step). Saved: a list, per run
{"grads": {layer: o_proj weight grad} or {} where a weight has no whole gradient (ZeRO-3), "logs": [training log
dicts]} after DDP's gradient averaging; rank 0 prints "[dist_probe] run I" before run I.

Why one process for several runs: each run in its own launch pays a ``llamafactory-cli`` parent, torchrun and every
rank's imports again (about 56 CPU s of a two-rank HARC launch's 65 on an idle machine; tests/dist_runs.py says
more). Each run gets its own $LLAMAFACTORY_HERA_CACHE, and run_exp ends by destroying the process group. From the
second run on, the probe sets the group up before run_exp (accelerate, and DeepSpeed's ``init_distributed``, then keep
it) under keys of its own in torchrun's store: set up again under the first run's keys, a rank could read the other's
stale gloo address and wait for it (seen: a hang at the second run's start). Between runs the probe forgets what a new
process would not have (:func:`as_a_new_process`); each run's engine evidence checks the engine it ran. A user resumes
in a new process: the tests resume in a launch of their own.
"""

import copy
import gc
import importlib.util
import json
import os
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import accelerate.state
import torch
from frozen_heap import freeze_what_is_alive  # tests/, beside this script
from llamafactory.train.tuner import run_exp
from transformers import TrainerCallback
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from llamafactory_hera.heads.architecture import head_projections
from llamafactory_hera.hera import teacher as teacher_module
from llamafactory_hera.hera import teacher_cache


class Probe(TrainerCallback):
    def __init__(self) -> None:
        self.grads: dict[int, torch.Tensor] | None = None
        self.logs: list[dict] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            grads = {i: m.weight.grad for i, m in head_projections(model).items()}
            whole = all(g is not None and g.numel() for g in grads.values())
            self.grads = {i: g.detach().clone() for i, g in grads.items()} if whole else {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.logs.append(dict(logs))


def process_group_of_its_own(index: int) -> None:
    """Under torchrun, from the second run on: the gloo process group, its keys prefixed by the run's index."""
    if index == 0 or "TORCHELASTIC_USE_AGENT_STORE" not in os.environ:
        return
    store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                       timeout=timedelta(minutes=10))
    torch.distributed.init_process_group("gloo", store=torch.distributed.PrefixStore(f"dist_probe_run{index}", store),
                                         rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))


def deepspeed_groups_reset() -> Callable[[], None]:
    """DeepSpeed keeps the process groups it made in module globals (deepspeed.utils.groups) and its backend in
    deepspeed.comm's ``cdb``: after run_exp destroyed the group, the next DeepSpeed run would use the dead ones
    ("Group ... is not registered"). Returns a function that puts them back as they were at import, as in a new
    process; a no-op where the launch does not use DeepSpeed."""
    if importlib.util.find_spec("deepspeed") is None:
        return lambda: None
    import deepspeed.comm.comm
    import deepspeed.utils.groups

    fresh = {k: copy.copy(v) for k, v in vars(deepspeed.utils.groups).items()
             if not k.startswith("__") and isinstance(v, (dict, type(None)))}

    def reset() -> None:
        for key, value in fresh.items():
            setattr(deepspeed.utils.groups, key, copy.copy(value))
        deepspeed.comm.comm.cdb = None
        unset_hf_deepspeed_config()  # transformers' weak reference to the last run's DeepSpeed config

    return reset


# each run's DDP wrappers, never freed (see keep_process_group_holders)
KEPT: list[object] = []


def keep_process_group_holders() -> None:
    """Keep the last run's DDP wrappers alive. A wrapper holds its reducer, and the reducer the run's gloo process
    group; left to the next garbage collection (a reference cycle, after run_exp destroyed the group), the group's
    destructor joins its worker threads, which waited on the other rank: on 2026-11-27 two of five launches of
    tests/hera/test_hera_distributed.py hung so, one rank in ``~ProcessGroupGloo`` under ``gc.collect`` (py-spy), the
    other in the next run's ``init_process_group``. A new process never frees them mid-run either."""
    KEPT.extend(obj for obj in gc.get_objects() if isinstance(obj, torch.nn.parallel.DistributedDataParallel))


def as_a_new_process() -> None:
    """What the next run must not inherit from the last: the plugin's loaded teachers (each run loads its own, so a
    ZeRO-3 run loads the teacher under ZeRO-3's config, outside zero.Init) and teacher-feature stores, accelerate's
    state and gradient state. DeepSpeed's: :func:`deepspeed_groups_reset`. What must outlive it: the last run's
    process-group holders (:func:`keep_process_group_holders`)."""
    keep_process_group_holders()
    teacher_module._TEACHERS.clear()
    teacher_cache._STORES.clear()
    reset_deepspeed()
    accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)  # the process group comes up again
    accelerate.state.GradientState._reset_state()
    # after the resets, so that what they drop is collected, not frozen: the libraries and their caches are frozen,
    # and later collections walk the next run's objects only (tests/frozen_heap.py)
    freeze_what_is_alive()


def patches_applied() -> dict[str, list[str]]:
    """What the plugin's start-up hook patched in this process: per host module it patched, every name there (a
    module global, or a class's attribute) bound to plugin code, as ``name=qualname@file:line``."""
    finder = next((f for f in sys.meta_path if type(f).__name__ == "_PostImportFinder"), None)
    if finder is None:  # the plugin disabled (LLAMAFACTORY_HERA_DISABLE=1): no hook, nothing patched
        return {}
    patched = type(finder).find_spec.__globals__["_patched"]

    def plugin_names(space: dict, prefix: str) -> list[str]:
        found = []
        for name, value in space.items():
            code = getattr(getattr(value, "__func__", value), "__code__", None)
            if code is not None and "llamafactory_hera" in code.co_filename:
                found.append(f"{prefix}{name}={value.__qualname__}@"
                             f"{code.co_filename.rsplit('site-packages', 1)[-1]}:{code.co_firstlineno}")
        return found

    fingerprint = {}
    for module_name in sorted(patched):
        space = vars(sys.modules[module_name])
        fingerprint[module_name] = sorted(plugin_names(space, "") + [
            line for name, value in space.items() if isinstance(value, type) and value.__module__ == module_name
            for line in plugin_names(vars(value), f"{name}.")])
    return fingerprint


MARK = "[dist_probe] run"
reset_deepspeed = deepspeed_groups_reset()
results = []
cache = os.environ.get("LLAMAFACTORY_HERA_CACHE") or str(Path(sys.argv[2]).with_name("hera_cache"))
launch_env = dict(os.environ)
for index, run in enumerate(json.loads(Path(sys.argv[1]).read_text())):
    os.environ.clear()
    os.environ.update(launch_env)
    os.environ["LLAMAFACTORY_HERA_CACHE"] = os.path.join(cache, f"run{index}")  # no run reads another's features
    os.environ.update(run["env"])
    as_a_new_process()
    process_group_of_its_own(index)
    if int(os.environ.get("RANK", "0")) == 0:  # rank 0's stdout (what the plugin says once) split by run
        print(f"{MARK} {index}", flush=True)
    probe = Probe()
    run_exp(run["recipe"], callbacks=[probe])
    results.append({"grads": probe.grads or {}, "logs": probe.logs, "patches": patches_applied()})
    del probe
if int(os.environ.get("RANK", "0")) == 0:
    torch.save(results, sys.argv[2])
