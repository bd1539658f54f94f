"""Under pytest-xdist, every worker starts with its share of the slowest test modules (conftest imports the hook).

``--dist worksteal`` first hands worker k the k-th contiguous slice of the collection, then lets an idle worker take
tests from the end of another's queue. A 3-minute test that a worker reaches late leaves the other worker idle at
the end of the run. So the modules below (the slowest of the CI runs: two-rank and DeepSpeed trainings) are dealt to
the workers' slices first, longest first to the slice with the least so far; the other tests keep their order and
fill the slices. A module moves whole, so its module-scoped fixtures are built once. Without xdist nothing moves.
"""

from __future__ import annotations

import os

import pytest

# Module -> seconds of its tests among CI's slowest 25 (pytest --durations, 2-core CI machine, November 2026; a
# module with none there: an estimate). Update it from `python3 dev.py test`'s slowest-25 list when a module becomes
# (or stops being) one of the slowest.
SLOW_MODULES = {
    "tests/harc/test_harc_stage.py": 474,
    "tests/test_fault_injection.py": 365,
    "tests/hera/test_hera_fsdp2.py": 251,
    "tests/hera/test_hera_deepspeed.py": 210,
    "tests/hera/test_hera_deepspeed_lora.py": 176,
    "tests/test_stock_stages_distributed.py": 123,
    "tests/test_stock_stops.py": 120,  # estimate: four two-rank launches, each stopped in step 3
    "tests/hera/test_hera_bench.py": 119,
    "tests/harc/test_harc_preemption.py": 117,
    "tests/test_readme.py": 104,
    "tests/hera/test_hera_distributed.py": 100,
    "tests/test_host_only.py": 100,
    "tests/test_multinode.py": 100,  # estimates: two simulated nodes, the requeue and a reference launch
    "tests/test_warm_launch.py": 90,  # a real torchrun launch beside two warm ones
    "tests/test_elastic.py": 100,  # estimate: a warm reference, then two simulated nodes' elastic launch restarted
    "tests/test_ray.py": 120,  # estimate: a Ray cluster, four Ray runs of two workers and a warm two-rank launch
}


def slow_first(items: list[pytest.Item], workers: int) -> list[pytest.Item]:
    """``items`` reordered so that each of the ``workers`` contiguous slices xdist deals out begins with slow modules
    (greedy: the next slowest module to the slice with the fewest seconds so far); the rest in their order."""
    modules: dict[str, list[pytest.Item]] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::", 1)[0], []).append(item)
    slices: list[list[pytest.Item]] = [[] for _ in range(workers)]
    seconds = [0] * workers
    # ties broken by name: a set's order follows the hash seed, which differs between xdist's workers, and every
    # worker must collect the same order
    for module in sorted(set(modules) & set(SLOW_MODULES), key=lambda name: (-SLOW_MODULES[name], name)):
        chosen = seconds.index(min(seconds))
        slices[chosen].extend(modules.pop(module))
        seconds[chosen] += SLOW_MODULES[module]
    rest = [item for module_items in modules.values() for item in module_items]
    # xdist sends the first worker len // workers tests, the next one len // workers of what is left, ...
    ordered: list[pytest.Item] = []
    for index, share in enumerate(slices):
        size = max(len(share), (len(items) - len(ordered)) // (workers - index))
        take = size - len(share) if index < workers - 1 else len(rest)
        ordered += share + rest[:take]
        rest = rest[take:]
    return ordered


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        items[:] = slow_first(items, workers)
