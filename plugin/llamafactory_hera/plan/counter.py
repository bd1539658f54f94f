"""One training step counted without weights or a GPU: FLOPs and peak tensor memory of a model under
``FakeTensorMode``. Ops on real tensors only (token ids, image grids) run for real, so data-dependent index
arithmetic works.
"""

from __future__ import annotations

import weakref

import torch
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

GIB = 2**30
SMALL = 1 << 22  # elements: a real computation larger than this is not index arithmetic
INDEX_FACTORIES = (torch.ops.aten.arange, torch.ops.aten.linspace, torch.ops.aten.lift_fresh)


def tensors_of(tree: object) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


class RealIndexMode(TorchDispatchMode):
    """Runs an op for real when no argument is fake and it is a view or small (a floating one made from nothing, a
    weight, stays fake); a real boolean mask selects a fake tensor by its true count."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        tensors = tensors_of((args, kwargs))
        parameter_like = (
            not tensors
            and func.overloadpacket not in INDEX_FACTORIES
            and (kwargs.get("dtype") or torch.get_default_dtype()).is_floating_point
        )  # a weight being made: fake
        if (
            not parameter_like
            and not any(isinstance(t, FakeTensor) for t in tensors)
            and (func.is_view or all(t.numel() <= SMALL for t in tensors))
        ):
            with unset_fake_temporarily():
                out = func(*args, **kwargs)
            if func.is_view or all(t.numel() <= SMALL for t in tensors_of(out)):
                return out
        if (
            func is torch.ops.aten.index.Tensor
            and len(args[1]) == 1
            and args[1][0] is not None
            and args[1][0].dtype == torch.bool
            and not isinstance(args[1][0], FakeTensor)
        ):
            mask = args[1][0]
            with unset_fake_temporarily():
                count = int(mask.sum())
            return torch.empty((count, *args[0].shape[mask.ndim :]), dtype=args[0].dtype, device=args[0].device)
        return func(*args, **kwargs)


class StepCounter(TorchDispatchMode):
    """Storages ops create (freed when their last tensor dies): ``peak``, the most bytes alive at once, and
    ``at_mark``, those alive at :meth:`mark`; ``exclude`` (parameters, gradients) is never counted."""

    def __init__(self, exclude: list[torch.Tensor] = ()) -> None:
        super().__init__()
        self.peak = self.at_mark = 0
        self.ops = 0  # aten ops dispatched: the host's work (each an eager kernel launch and its Python)
        self._live: dict[int, tuple[weakref.ref, int]] = {}  # storage -> (weak reference, bytes)
        self._total = 0
        self._skip = {t.untyped_storage()._cdata for t in exclude}

    def _free(self, key: int) -> None:
        entry = self._live.pop(key, None)
        if entry is not None:
            self._total -= entry[1]

    def mark(self) -> None:
        """The forward's end: what is alive now, backward reads."""
        self.at_mark = self._total

    def record(self, out: object) -> None:
        """Count ``out``'s new storages, and the peak."""
        for tensor in tensors_of(out):
            storage = tensor.untyped_storage()
            key = storage._cdata
            if key in self._live or key in self._skip:
                continue
            size = storage.nbytes()
            self._live[key] = (weakref.ref(storage), size)
            self._total += size
            weakref.finalize(storage, self._free, key)
        self.peak = max(self.peak, self._total)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if func.namespace != "prim":  # a fake tensor's metadata queries (prim.device) dispatch; a real tensor's do not
            self.ops += 1
        out = func(*args, **(kwargs or {}))
        self.record(out)
        return out


def _heads(q: list[int], *kv: list[int]) -> list[list[int]]:  # grouped-query attention: a key head serves several
    return [q, *([*q[:2], *shape[2:]] for shape in kv)]


def count_attention() -> None:
    """Torch's GPU-kernel FLOP formulas for the CPU attention kernel and its backward, which ``FlopCounterMode``
    scores 0 (docs/cost.md, "What it counts"); idempotent."""
    aten = torch.ops.aten
    flop_counter.flop_registry[aten._scaled_dot_product_flash_attention_for_cpu] = flop_counter.shape_wrapper(
        lambda q, k, v, *_, **__: flop_counter.sdpa_flop_count(*_heads(q, k, v))
    )
    flop_counter.flop_registry[aten._scaled_dot_product_flash_attention_for_cpu_backward] = flop_counter.shape_wrapper(
        lambda grad, q, k, v, *_, **__: flop_counter.sdpa_backward_flop_count(grad, *_heads(q, k, v))
    )


class StepFlops(flop_counter.FlopCounterMode):
    """``FlopCounterMode`` tracking no module: torch's module tracker keeps every forward's inputs and outputs alive
    to the backward's end, inflating the peak."""

    def __init__(self) -> None:
        super().__init__(display=False)
        self.mod_tracker = _NoModules()


class _NoModules:
    parents = frozenset({"Global"})

    def __enter__(self) -> _NoModules:
        return self

    def __exit__(self, *args: object) -> None:
        return None
