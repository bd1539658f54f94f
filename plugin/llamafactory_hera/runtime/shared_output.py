"""A run on several nodes needs one ``output_dir`` every node sees: each node's ranks write their own files into its
checkpoints (RNG states, shards), the main process the markers and the run's record, and a requeue resumes every rank
from there. On a folder of each node's own disk a run ends well and its requeue fails (one node resumes, the others
start afresh: a collective mismatch, an abort). So after LLaMA-Factory parses the recipe (the process group
up, nothing loaded), local rank 0 of each node writes a probe file into ``output_dir`` and reads the other nodes'
(their names through the job's store); one it does not see is a refusal. ``save_on_each_node: true`` (a folder on
each node's disk, by choice) is left alone. docs/multinode.md ("Where things live").
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

from llamafactory_hera.runtime.errors import RecipeError

PROBE_PREFIX = "llamafactory_hera_node_probe."  # a probe file's name: the prefix and a token of its own
WAIT_S = 600.0  # how long a node waits for the others' probes (they parse the recipe at their own pace)
SEEN_S = 30.0  # how long a node looks for another node's probe before it is missing (a shared file system's cache)
_POLL_S = 0.5


def refuse_unshared(training_args: Any) -> None:
    """The probe of :func:`check_shared` on local rank 0 of each node of a multi-node job (nothing on one node)."""
    # lazy: torch only here, the checks before the parse run without it
    import torch.distributed as dist

    try:
        local_world = int(os.environ["LOCAL_WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError):
        return
    if getattr(training_args, "save_on_each_node", False) or not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size()
    if local_rank != 0 or local_world < 1 or world <= local_world:
        return
    node = int(os.environ.get("GROUP_RANK") or dist.get_rank() // local_world)
    prefix = f"llamafactory_hera_probe/{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}/"  # this launch's keys
    check_shared(
        Path(training_args.output_dir),
        dist.distributed_c10d._get_default_store(),  # the job's store: host-side, no collective
        prefix,
        node,
        world // local_world,
        WAIT_S,
        SEEN_S,
    )


def _write(path: Path, text: str) -> None:
    """``text`` at ``path``, on the file system's disk (then the folder's entry) before any other node looks."""
    path.write_text(text, encoding="utf-8")
    for target in (path, path.parent):
        handle = os.open(target, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


def _seen(path: Path, seconds: float) -> bool:
    """Whether ``path`` shows up within ``seconds`` (listing its folder asks the file system again)."""
    deadline = time.monotonic() + seconds
    while True:
        with contextlib.suppress(OSError):
            if path.is_file() or path.name in os.listdir(path.parent):
                return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_S)


def check_shared(
    folder: Path, store: Any, prefix: str, node: int, nodes: int, wait: float = WAIT_S, seen: float = SEEN_S
) -> None:
    """Node ``node`` of ``nodes``: its probe written into ``folder`` and named in ``store`` (keys under ``prefix``),
    the other nodes' probes looked for; once every node has looked, its own removed. RecipeError naming a probe this
    node does not see."""
    host = socket.gethostname()
    folder.mkdir(parents=True, exist_ok=True)
    mine = folder / f"{PROBE_PREFIX}{uuid.uuid4().hex}"
    _write(mine, json.dumps({"node": node, "host": host}))
    try:
        store.set(f"{prefix}wrote/{node}", json.dumps({"host": host, "file": mine.name}))
        store.wait([f"{prefix}wrote/{k}" for k in range(nodes)], timedelta(seconds=wait))
        missing = []
        for other in range(nodes):
            written = json.loads(store.get(f"{prefix}wrote/{other}"))
            if other != node and not _seen(folder / written["file"], seen):
                missing.append(f"node {other} ({written['host']}) wrote {written['file']}")
        store.set(f"{prefix}looked/{node}", "1")  # the others may remove their probes once every node looked
        store.wait([f"{prefix}looked/{k}" for k in range(nodes)], timedelta(seconds=wait))
    finally:
        mine.unlink(missing_ok=True)
    if missing:
        raise RecipeError(
            f"output_dir: {folder} is not one folder shared by the job's {nodes} nodes: node {node} ({host}) does not "
            f"see the files the others wrote into it ({'; '.join(missing)}). Each node would keep its ranks' "
            "checkpoint files there on a disk of its own, and the requeue would resume the nodes' ranks from "
            "different states. Set output_dir to a folder every node mounts (NFS, Lustre, GPFS)."
        )
