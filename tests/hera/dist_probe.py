"""Run recipes one after another through LLaMA-Factory's run_exp (under torchrun or not) and dump rank 0's first-step
gradients of each.

Usage: [torchrun --nproc_per_node N] dist_probe.py RECIPES.json OUT.pt
RECIPES.json: a list of recipes. Saved: a list, per recipe {"grads": {layer: o_proj weight grad}, "logs": [training
log dicts]} after DDP's gradient averaging. Several recipes share one process (its imports, ~10 CPU s per process
and rank); each run gets its own $LLAMAFACTORY_HERA_CACHE, and run_exp ends by destroying the process group, which
the next run sets up again, as a fresh process would.
"""

import json
import os
import sys
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


results = []
cache = os.environ.get("LLAMAFACTORY_HERA_CACHE") or str(Path(sys.argv[2]).with_name("hera_cache"))
for index, recipe in enumerate(json.loads(Path(sys.argv[1]).read_text())):
    os.environ["LLAMAFACTORY_HERA_CACHE"] = os.path.join(cache, f"run{index}")  # no run reads another's features
    accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)  # the process group comes up again
    probe = Probe()
    run_exp(recipe, callbacks=[probe])
    results.append({"grads": probe.grads, "logs": probe.logs})
if int(os.environ.get("RANK", "0")) == 0:
    torch.save(results, sys.argv[2])
