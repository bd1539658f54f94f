"""Run one recipe through LLaMA-Factory's run_exp (under torchrun or not) and dump rank 0's first-step gradients.

Usage: [torchrun --nproc_per_node N] dist_probe.py RECIPE.json OUT.pt
Saved: {"grads": {layer: o_proj weight grad}, "logs": [training log dicts]} after DDP's gradient averaging.
"""

import json
import sys

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


probe = Probe()
run_exp(json.load(open(sys.argv[1])), callbacks=[probe])
if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
    torch.save({"grads": probe.grads, "logs": probe.logs}, sys.argv[2])
