"""One rank of a simulated multi-process job, for tests/test_job_refusal.py (not a test module).

``python refusal_rank.py WHAT TIME_FILE`` (under torchrun, ``accelerate launch``, or alone with the environment
``srun`` or torchrun sets): the plugin's excepthook installed as in a training process; each rank writes the time into
TIME_FILE.RANK (after importing torch, as a rank runs its checks after), then joins the job's process group (gloo,
with a 600 s timeout: ``ddp_timeout``) and waits there, as a rank waits for one that never comes, except where WHAT
makes it refuse:

- ranks, comma-separated (``1``, ``0,1``): these ranks raise a :class:`RecipeError` before joining;
- ``teacher``: every rank checks a frozen module whose weights differ per rank (hera/teacher_run.py
  ``check_same_on_every_rank``): every rank refuses;
- ``adapter``: rank 0 refuses a pre-fix FSDP2 adapter checkpoint (engines/fsdp_adapter.py, as patched by the start-up
  hook) while the other ranks wait in the broadcast from rank 0 that restores it.
"""

from __future__ import annotations

import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from llamafactory_hera import job_refusal
from llamafactory_hera.runtime.errors import RecipeError

job_refusal.install()
rank = int(os.environ.get("RANK") or os.environ["SLURM_PROCID"])
world = int(os.environ.get("WORLD_SIZE") or os.environ["SLURM_NTASKS"])
what = sys.argv[1]
if what == "teacher":  # imported before the stamp: a rank is up when it has loaded what it runs
    from llamafactory_hera.hera.teacher_run import check_same_on_every_rank
elif what == "adapter":  # a LLaMA-Factory process (the plugin patches accelerate only there)
    import accelerate.utils.fsdp_utils as fsdp_utils
    import llamafactory.extras.constants  # noqa: F401 - the patch of fsdp_utils waits for LLaMA-Factory
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    from llamafactory_hera_patches.engines import fsdp_adapter
stamp = f"{sys.argv[2]}.{rank}"  # when this rank refused, or began to wait for the others
with open(f"{stamp}.tmp", "w", encoding="utf-8") as file:
    file.write(str(time.time()))
os.replace(f"{stamp}.tmp", stamp)  # whole or absent: the test polls for it
# as a method's rank watches (its first check starts it); after the stamp: a rank the other's refusal ends at once
# must have said it was up first (under load, one ended between the two and the test read it as never up)
job_refusal.watch()
if what not in {"teacher", "adapter"} and str(rank) in what.split(","):
    raise RecipeError(f"hera_k: 0 is out of range (rank {rank}). Set hera_k to 1 or more.")
dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world, timeout=timedelta(seconds=600))
if what == "teacher":
    teacher = torch.nn.Linear(2, 2, bias=False)
    torch.nn.init.constant_(teacher.weight, rank)  # rank 1's weights are not rank 0's (zeros: as a loader left them)
    check_same_on_every_rank(teacher, "hera_teacher", "tiny-dino")
elif what == "adapter":
    model = torch.nn.Module()
    model.lora_A = torch.nn.ModuleDict({"default": torch.nn.Linear(2, 2)})
    fsdp_utils.is_peft_model = lambda module: True
    # torch's name -> PEFT's, as PEFT gives them for a real adapter (this stand-in is no PeftModel)
    fsdp_adapter._peft_names = lambda module: {"lora_A.default.weight": "lora_A.weight",
                                               "lora_A.default.bias": "lora_A.bias"}
    # rank 0 read a file naming no parameter of the model (stock accelerate's shards are under other names)
    state = {"base_model.model.lora_A.weight": torch.zeros(2, 2)} if rank == 0 else {}
    fsdp_utils._set_model_state_dict(model, state, adapter_only=True, sd_options=StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=True))
dist.barrier()
