"""The bytes a block of code moves through torch.distributed's collectives, counted where they are dispatched."""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class CollectiveBytes(TorchDispatchMode):
    """Within ``with CollectiveBytes() as counted:`` (forward and backward alike: the mode rides on autograd's thread
    state), ``counted.bytes[op name]`` sums, for each collective (the functional collectives DTensor and FSDP2 use,
    ``_c10d_functional.*``, and c10d's own ops ``c10d.*``, which ``torch.distributed.all_gather_into_tensor`` and the
    like dispatch to), the size of its largest tensor: an all-gather's output, a reduce-scatter's input, the whole
    tensor either way."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func.namespace in ("_c10d_functional", "c10d") \
                and not func.__name__.startswith(("wait", "_wrap")):  # a wait, an autograd wrapper: no transfer
            sizes = [t.numel() * t.element_size() for t in tree_leaves((args, kwargs, out))
                     if isinstance(t, torch.Tensor)]
            self.bytes[func.__name__.split(".")[0]] += max(sizes, default=0)
        return out

    def gathered(self) -> int:
        """Bytes all-gathered (every all-gather's output)."""
        return sum(n for name, n in self.bytes.items() if "all_gather" in name or "allgather" in name)
