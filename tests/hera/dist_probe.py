"""Run recipes one after another through LLaMA-Factory's run_exp (under torchrun or not) and dump rank 0's first-step
gradients of each.

Usage: [torchrun --nproc_per_node N] dist_probe.py RECIPES.json OUT.pt
RECIPES.json: a list of recipes. Saved: a list, per recipe {"grads": {layer: o_proj weight grad}, "logs": [training
log dicts]} after DDP's gradient averaging; rank 0 prints "[dist_probe] run I" before run I. Several recipes share
one process (its imports, ~10 CPU s per process and rank); each run gets its own $LLAMAFACTORY_HERA_CACHE, and
run_exp ends by destroying the process group. From the second run on, the probe sets the group up before run_exp
(accelerate then keeps it) under keys of its own in torchrun's store: set up again under the first run's keys, a
rank could read the other's stale gloo address and wait for it (seen: a hang at the second run's start).
"""

import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import accelerate.state
import torch
from llamafactory.train.tuner import run_exp
from transformers import TrainerCallback

from llamafactory_hera.heads.architecture import head_projections


class Probe(TrainerCallback):
    def __init__(self) -> None:
        self.grads: dict[int, torch.Tensor] = {}
        self.logs: list[dict] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if not self.grads:
            self.grads = {i: m.weight.grad.detach().clone() for i, m in head_projections(model).items()}

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


MARK = "[dist_probe] run"
results = []
cache = os.environ.get("LLAMAFACTORY_HERA_CACHE") or str(Path(sys.argv[2]).with_name("hera_cache"))
for index, recipe in enumerate(json.loads(Path(sys.argv[1]).read_text())):
    os.environ["LLAMAFACTORY_HERA_CACHE"] = os.path.join(cache, f"run{index}")  # no run reads another's features
    accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)  # the process group comes up again
    process_group_of_its_own(index)
    if int(os.environ.get("RANK", "0")) == 0:  # rank 0's stdout (what the plugin says once) split by run
        print(f"{MARK} {index}", flush=True)
    probe = Probe()
    run_exp(recipe, callbacks=[probe])
    results.append({"grads": probe.grads, "logs": probe.logs})
if int(os.environ.get("RANK", "0")) == 0:
    torch.save(results, sys.argv[2])
