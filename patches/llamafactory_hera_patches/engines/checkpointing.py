"""The host's non-reentrant gradient checkpointing function, for a method that needs it in some layers only.

Checked on LLaMA-Factory 0.9.5 with transformers 5.6: ``prepare_model_for_training`` installs
``get_custom_gradient_checkpointing_func(partial(checkpoint, use_reentrant=model_args.use_reentrant_gc))`` as every
checkpointing module's ``_gradient_checkpointing_func`` (it checkpoints only modules with trainable parameters, their
hidden states marked as requiring gradient); ``GradientCheckpointingLayer`` calls it with
``partial(layer.__call__, **kwargs), *args``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache, partial
from types import CodeType

from torch.utils.checkpoint import checkpoint

from ..guard import mismatch


def _trainable_only_wrapper() -> Callable[[Callable], Callable]:
    """The host's ``get_custom_gradient_checkpointing_func``."""
    # lazy: the host loads when it runs, not with the patches at start-up
    import llamafactory.model.model_utils.checkpointing as module

    custom = getattr(module, "get_custom_gradient_checkpointing_func", None)
    if custom is None:
        raise mismatch(
            "checkpointing",
            "llamafactory.model.model_utils.checkpointing has no get_custom_gradient_checkpointing_func",
        )
    return custom


def non_reentrant_checkpointing() -> Callable:
    """What the host gives each layer under ``use_reentrant_gc: false``."""
    return _trainable_only_wrapper()(partial(checkpoint, use_reentrant=False))


@cache
def _wrapper_code() -> CodeType:
    return _trainable_only_wrapper()(partial(checkpoint, use_reentrant=True)).__code__


def checkpoints_trainable_only(function: object) -> bool:
    """Whether a layer's ``_gradient_checkpointing_func`` is the host's wrapper (any checkpoint inside): it checkpoints
    the layer (``func.func.__self__``) only if a parameter requires grad, else calls it plainly."""
    return getattr(function, "__code__", None) is _wrapper_code()
