"""A multi-node run needs one ``output_dir`` all nodes see: each node's ranks write checkpoint files there, and a
requeue resumes every rank from them. On each node's own disk the requeue fails (one node resumes, the others start
afresh: a collective mismatch). So after the parse, local rank 0 of each node writes a probe there and looks for the
other nodes' (named in the job's store); one unseen is a refusal. ``save_on_each_node: true`` is left alone.
docs/multinode.md ("Where things live").
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

from llamafactory_hera.runtime import elastic
from llamafactory_hera.runtime.errors import RecipeError

PROBE_PREFIX = "llamafactory_hera_node_probe."  # + a token
WAIT_S = 600.0  # for the others' probes (each node parses at its own pace)
SEEN_S = 30.0  # to see another's probe (a shared file system's cache)
_POLL_S = 0.5


def refuse_unshared(training_args: Any) -> None:
    """:func:`check_shared` on local rank 0 of each node of a multi-node job (nothing on one node)."""
    # lazy: the checks before the parse run without torch
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
    prefix = f"llamafactory_hera_probe/{elastic.start_key()}/"  # this start's keys
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
    """Write ``text`` and fsync it, then its folder, before any other node looks."""
    path.write_text(text, encoding="utf-8")
    for target in (path, path.parent):
        handle = os.open(target, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


def _seen(path: Path, seconds: float) -> bool:
    """Whether ``path`` shows up within ``seconds`` (listing the folder asks the file system again)."""
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
    """Node ``node`` of ``nodes``: write a probe into ``folder``, name it in ``store`` (keys under ``prefix``), look for
    the others', remove it once all looked. RecipeError naming a probe not seen."""
    host = socket.gethostname()
    folder.mkdir(parents=True, exist_ok=True)
    mine = folder / f"{PROBE_PREFIX}{uuid.uuid4().hex}"
    _write(mine, json.dumps({"node": node, "host": host}))
    try:
        store.set(f"{prefix}wrote/{node}", json.dumps({"host": host, "file": mine.name}))
        store.wait([f"{prefix}wrote/{k}" for k in range(nodes)], timedelta(seconds=wait))
        missing = []
        every = store.multi_get([f"{prefix}wrote/{k}" for k in range(nodes)])  # one call: O(nodes) for the job
        for other, raw in enumerate(every):
            written = json.loads(raw)
            if other != node and not _seen(folder / written["file"], seen):
                missing.append(f"node {other} ({written['host']}) wrote {written['file']}")
        store.set(f"{prefix}looked/{node}", "1")  # probes go once every node looked
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
