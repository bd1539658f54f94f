"""``hera_heads: auto``: select heads once at the start of training on global rank 0, broadcast to the other ranks,
cached; the random state is restored, so a cache hit and a miss train identically.
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llamafactory_hera.heads.geometry import HeadRef, parse_head
from llamafactory_hera.hera.config import HeraArguments
from llamafactory_hera.hera.selection.collect import release_memory
from llamafactory_hera.hera.selection.recipe_write import SelectionResult, write_outputs
from llamafactory_hera.hera.selection.select import SelectionOptions, run_selection
from llamafactory_hera.hera.teacher_cache import cache_root, cache_unwritable
from llamafactory_hera.runtime import save_signal
from llamafactory_hera.runtime.errors import RecipeError
from llamafactory_hera.runtime.log import line, say
from llamafactory_hera.training import sections

RECORD_NAME = "hera_selection.json"
HEATMAP_NAME = "hera_selection.png"


# the other ranks wait in a collective for ddp_timeout seconds while rank 0 scores
SHORT_DDP_TIMEOUT_S = 3 * 3600
FITTING_DDP_TIMEOUT_S = 180000000  # the project's recipes


def short_ddp_timeout_warning(world_size: int, ddp_timeout: int | None) -> str | None:
    """The warning for several ranks with a ``ddp_timeout`` the selection may outlast."""
    if world_size <= 1 or ddp_timeout is None or ddp_timeout >= SHORT_DDP_TIMEOUT_S:
        return None
    others = world_size - 1
    return line(
        f"warning: hera_heads: auto scores the heads on rank 0 while the other {others} "
        f"rank(s) wait for at most ddp_timeout: {ddp_timeout} s; loading a large model (after its first "
        "download) and scoring can take longer, and the run then dies in a timeout. Set ddp_timeout: "
        f"{FITTING_DDP_TIMEOUT_S} (as the recipes do), or list the heads of `llamafactory-hera select` in "
        "hera_heads."
    )


def cache_dir() -> Path | None:
    """Folder of cached selections; None (said once) where unwritable."""
    folder = cache_root() / "selection"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()  # read-only: mkdir passes, a write would not
    except OSError as err:
        cache_unwritable(folder, err)
        return None
    return folder


@contextlib.contextmanager
def preserved_random_state() -> Iterator[None]:
    """Restore Python's, NumPy's and torch's (CPU, CUDA) random state on exit."""
    py_state = random.getstate()
    np_state = np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


@save_signal.keeping()  # the save signal stops the selection after a kept batch
def resolve_auto_heads(
    recipe_args: Any, hera_args: HeraArguments, seed: int, device: str, output_dir: str, is_main: bool, *, dtype: str
) -> list[HeadRef]:
    """Select (or reuse) on the main process in ``dtype``; every rank gets the heads. Collective."""
    payload: list[Any] = [None, None, False]  # heads, rank 0's error, is it a user error
    if is_main:
        try:
            args = copy.deepcopy(recipe_args)
            args.data_args.max_samples = None

            with preserved_random_state():  # the scoring copy and teacher load whole
                options = SelectionOptions.from_keys(hera_args, seed=seed, device=device, dtype=dtype)
                result, cached = run_selection(args, options, cache_dir())
            _record(result, cached, output_dir)

            release_memory(device)  # before this rank loads its model
            payload = [result.selected, None, False]
        except save_signal.Stopped:  # the save signal: every rank stops with rank 0
            payload = [None, None, None]
        except Exception as err:  # noqa: BLE001 - re-raised on every rank below
            by_user = isinstance(err, RecipeError)  # a bug keeps its type name
            payload = [None, str(err) if by_user else f"{type(err).__name__}: {err}", by_user]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        with sections.collective("the broadcast of rank 0's head selection"):
            torch.distributed.broadcast_object_list(payload, src=0)
    heads, error, by_user = payload
    if by_user is None:
        raise save_signal.Stopped(0)
    if error is not None:
        raise (RecipeError if by_user else RuntimeError)(f"hera_heads: auto: head selection failed on rank 0: {error}")
    return [parse_head(name) for name in heads]


def _record(result: SelectionResult, cached: bool, output_dir: str) -> None:
    os.makedirs(output_dir, exist_ok=True)
    write_outputs(
        result,
        Path(output_dir) / RECORD_NAME,
        Path(output_dir) / HEATMAP_NAME,
        f"MKNN per head ({result.settings['mode']}, {result.num_pairs} pairs, k={result.settings['k']}); "
        f"{result.strategy}-{len(result.selected)}",
    )
    source = "reusing cached head selection" if cached else "selected heads"
    say(f"hera_heads: auto -> [{', '.join(result.selected)}] ({source}; record: {Path(output_dir) / RECORD_NAME})")
