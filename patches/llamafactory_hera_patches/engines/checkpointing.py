"""LLaMA-Factory's gradient checkpointing function in its non-reentrant form: what every layer runs under
``use_reentrant_gc: false``, for a method that needs it in some layers only.

Checked on LLaMA-Factory 0.9.5 with transformers 5.6: ``prepare_model_for_training`` installs
``llamafactory.model.model_utils.checkpointing.get_custom_gradient_checkpointing_func(partial(checkpoint,
use_reentrant=model_args.use_reentrant_gc))`` as ``_gradient_checkpointing_func`` of every module with
``gradient_checkpointing`` (it checkpoints only modules with trainable parameters and marks their hidden states as
requiring gradient); transformers' ``GradientCheckpointingLayer`` calls it as
``self._gradient_checkpointing_func(partial(layer.__call__, **kwargs), *args)``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache, partial
from types import CodeType

from torch.utils.checkpoint import checkpoint

from ..guard import mismatch


def _trainable_only_wrapper() -> Callable[[Callable], Callable]:
    """LLaMA-Factory's ``get_custom_gradient_checkpointing_func``: wraps a checkpoint function so that it checkpoints
    only modules with a trainable parameter and calls the others plainly."""
    import llamafactory.model.model_utils.checkpointing as module  # lazy

    custom = getattr(module, "get_custom_gradient_checkpointing_func", None)
    if custom is None:
        raise mismatch(
            "checkpointing",
            "llamafactory.model.model_utils.checkpointing has no get_custom_gradient_checkpointing_func",
        )
    return custom


def non_reentrant_checkpointing() -> Callable:
    """The function LLaMA-Factory gives each layer under ``use_reentrant_gc: false``."""
    return _trainable_only_wrapper()(partial(checkpoint, use_reentrant=False))


@cache
def _wrapper_code() -> CodeType:
    return _trainable_only_wrapper()(partial(checkpoint, use_reentrant=True)).__code__


def checkpoints_trainable_only(function: object) -> bool:
    """Whether ``function`` (a layer's ``_gradient_checkpointing_func``) is LLaMA-Factory's wrapper, whatever the
    checkpoint function inside: it checkpoints a module only when ``any(p.requires_grad for p in
    module.parameters())``, the module being the layer (``func.func.__self__``), and calls the others plainly."""
    return getattr(function, "__code__", None) is _wrapper_code()
