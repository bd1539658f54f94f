"""Test-only start-up hook: LLaMA-Factory's ``USE_RAY=1`` path schedules on a CPU-only Ray cluster.

LLaMA-Factory 0.9.5 and main (``llamafactory/train/trainer_utils.py``) ask ``{"CPU": 10}`` for each placement bundle,
one bundle per device of the cluster (on a cluster without GPUs: per CPU), and ``num_cpus: 10`` for each worker: such
a group can never be placed, and ``ray.get(pg.ready())`` waits for ever. With this folder on ``PYTHONPATH`` (the
driver's, and through Ray's ``runtime_env`` its workers'), the same bundles ask 1 CPU each and each worker 1 CPU (a
cluster of 2 CPUs: 2 bundles, 2 workers); nothing else of the path changes (the workers' ranks, ``MASTER_ADDR``,
``run_exp`` in each worker). The patch lands when ``trainer_utils`` has executed, before ``llamafactory.train.tuner``
binds the names it imports from it.
Like every process a test starts, the process does not see the packages its run does not use
(tests/process_hooks/unused_packages.py, which it puts on ``sys.path``: Python runs the first ``sitecustomize``).
"""

import functools
import os
import sys

sys.path.append(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "process_hooks"))
import deepspeed_shm  # noqa: E402, F401 - tests/process_hooks/
import unused_packages  # noqa: E402, F401
from after_import import patch_after_import  # noqa: E402

CPUS_PER_WORKER = 1


def _one_cpu_bundles(num_workers: int, placement_group) -> tuple:
    """``get_placement_group``'s stand-in: ``num_workers`` bundles (LLaMA-Factory passes the cluster's device count)
    of one CPU."""
    bundle = {"CPU": CPUS_PER_WORKER}
    return placement_group([bundle] * num_workers, strategy="PACK"), bundle


def _one_cpu_worker(remote_config, *args, **kwargs) -> dict:
    """``get_ray_remote_config_for_worker``'s stand-in: the host's config asking one CPU."""
    return {**remote_config(*args, **kwargs), "num_cpus": CPUS_PER_WORKER}


def _patch(trainer_utils) -> None:
    trainer_utils.get_placement_group = functools.partial(
        _one_cpu_bundles, placement_group=trainer_utils.placement_group)
    trainer_utils.get_ray_remote_config_for_worker = functools.partial(
        _one_cpu_worker, trainer_utils.get_ray_remote_config_for_worker)


patch_after_import({"llamafactory.train.trainer_utils": _patch})
