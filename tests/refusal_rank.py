"""One rank of a simulated multi-process job, for tests/test_job_refusal.py (not a test module).

``python refusal_rank.py REFUSING_RANK TIME_FILE`` (under torchrun, ``accelerate launch``, or alone with
``SLURM_PROCID`` / ``SLURM_NTASKS`` / ``MASTER_*`` as ``srun`` sets them): the plugin's excepthook installed as in a
training process; each rank writes the time into TIME_FILE.RANK (after importing torch, as a rank runs its checks
after), then rank REFUSING_RANK raises a :class:`RecipeError` and the others join the job's process group (gloo)
with a 600 s timeout (``ddp_timeout``) and wait there, as a rank waits for one that never comes.
"""

from __future__ import annotations

import os
import sys
import time
from datetime import timedelta

import torch.distributed as dist

from llamafactory_hera import job_refusal
from llamafactory_hera.short_errors import RecipeError

job_refusal.install()
rank = int(os.environ.get("RANK") or os.environ["SLURM_PROCID"])
world = int(os.environ.get("WORLD_SIZE") or os.environ["SLURM_NTASKS"])
stamp = f"{sys.argv[2]}.{rank}"  # when this rank refused, or began to wait for the others
with open(f"{stamp}.tmp", "w", encoding="utf-8") as file:
    file.write(str(time.time()))
os.replace(f"{stamp}.tmp", stamp)  # whole or absent: the test polls for it
if rank == int(sys.argv[1]):
    raise RecipeError(f"hera_k: 0 is out of range (rank {rank}). Set hera_k to 1 or more.")
dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world, timeout=timedelta(seconds=600))
dist.barrier()
