"""Gradient checkpointing where a method's gradient needs it: non-reentrant in the layers a method reads inside (HeRA's
heads' layers) unless the method reads a reentrant layer itself (``hera/capture.py``), and in every KV-sharing chain (a
layer whose keys and values later layers read, and its readers: Gemma 3n, Gemma 4); the recipe's kind elsewhere. HARC
switches only the chains. Why, cost, measurements: docs/hera-design.md ("Gradient checkpointing").
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from torch import nn
from torch.utils.checkpoint import checkpoint

from llamafactory_hera.heads.architecture import decoder_layers, kv_sharing_chains, text_decoder
from llamafactory_hera_patches.engines.checkpointing import checkpoints_trainable_only, non_reentrant_checkpointing

__all__ = ["NO_TRAINABLE", "LayerCheckpointing", "checkpointing_kind"]

NO_TRAINABLE = "off (no trainable parameters)"


def checkpointing_kind(module: nn.Module) -> str:
    """What ``module`` runs under in training: ``off``, :data:`NO_TRAINABLE` (LLaMA-Factory calls it plainly),
    ``reentrant``, ``non-reentrant``, or ``custom`` (Unsloth's)."""
    if not getattr(module, "gradient_checkpointing", False):
        return "off"
    function = getattr(module, "_gradient_checkpointing_func", None)
    if checkpoints_trainable_only(function) and not any(param.requires_grad for param in module.parameters()):
        return NO_TRAINABLE
    inner = inspect.unwrap(function)  # LLaMA-Factory's wraps a partial
    if isinstance(inner, functools.partial) and inner.func is checkpoint:
        value = inner.keywords.get("use_reentrant")
        if value is not None:
            return "reentrant" if value else "non-reentrant"
    return "custom"


class _Switch(NamedTuple):
    """A decoder layer's checkpointing as last seen."""

    on: bool
    function: Any


class LayerCheckpointing:
    """Switches the method's ``layers`` (named by ``owner``) and every KV-sharing chain's from reentrant to
    non-reentrant (LLaMA-Factory's ``use_reentrant_gc: false`` function). With ``reentrant(index, function)``, the
    method's layers outside a chain stay reentrant through the function it returns. :meth:`ensure` runs before every
    training forward: the Trainer re-enables reentrant checkpointing at the start."""

    def __init__(
        self,
        model: nn.Module,
        layers: Iterable[int],
        owner: str = "HeRA's heads",
        reentrant: Callable[[int, Callable[..., Any]], Callable[..., Any]] | None = None,
    ) -> None:
        self._decoder_layers = list(text_decoder(model).layers)
        self._chains = kv_sharing_chains(decoder_layers(model))  # source -> its readers (KV sharing)
        self._shared = sorted({index for source, readers in self._chains.items() for index in (source, *readers)})
        self._heads = sorted(set(layers))
        self.owner = owner
        self._reentrant = reentrant
        self.recipe: dict[int, str] = {}  # wanted layer -> its kind before the switch
        self.read_through: set[int] = set()  # the method's layers kept reentrant
        self._function: Any = None  # built at the first switch
        self._seen: dict[int, _Switch] = {}
        self.ensure()

    def _wanted(self) -> list[int]:
        return sorted(set(self._heads) | set(self._shared))

    def ensure(self) -> None:
        for index in self._wanted():
            layer = self._decoder_layers[index]
            state = _Switch(
                getattr(layer, "gradient_checkpointing", False),
                getattr(layer, "_gradient_checkpointing_func", None),
            )
            if self._seen.get(index) == state:
                continue
            self.recipe[index] = checkpointing_kind(layer)
            self.read_through.discard(index)
            if self.recipe[index] == "reentrant" and self._reentrant is not None and index not in self._shared:
                layer._gradient_checkpointing_func = self._reentrant(index, state.function)
                self.read_through.add(index)
                state = state._replace(function=layer._gradient_checkpointing_func)
            elif self.recipe[index] == "reentrant":
                if self._function is None:
                    self._function = non_reentrant_checkpointing()
                layer._gradient_checkpointing_func = self._function
                state = state._replace(function=self._function)
            self._seen[index] = state

    def switched(self) -> list[int]:
        return [
            index
            for index in self._wanted()
            if self.recipe.get(index) == "reentrant"
            and checkpointing_kind(self._decoder_layers[index]) == "non-reentrant"
        ]

    def line(self) -> str:
        """Each decoder layer's kind after :meth:`ensure`, e.g. ``gradient checkpointing: reentrant (the recipe's) in 31
        of 36 decoder layers; non-reentrant in layers 3, 9 (HeRA's heads)``."""
        self.ensure()
        switched = self.switched()
        total = len(self._decoder_layers)
        kinds: dict[str, int] = {}
        for index, layer in enumerate(self._decoder_layers):
            if index not in switched:
                kind = checkpointing_kind(layer)
                kinds[kind] = kinds.get(kind, 0) + 1
        parts = [
            (kind if kind == NO_TRAINABLE else f"{kind} (the recipe's)")
            + " in "
            + ("every decoder layer" if count == total else f"{count} of {total} decoder layers")
            for kind, count in kinds.items()
        ]
        own = [index for index in switched if index in self._heads]
        shared = [index for index in switched if index not in self._heads]
        for indices, why in ((own, self.owner), (shared, self._chain_words())):
            if indices:
                parts.append(
                    f"non-reentrant in layer{'s' if len(indices) > 1 else ''} {', '.join(map(str, indices))} ({why})"
                )
        if read := sorted(self.read_through):
            parts.append(
                f"{self.owner} read out of the reentrant checkpoint of layer{'s' if len(read) > 1 else ''} "
                f"{', '.join(map(str, read))}"
            )
        return "gradient checkpointing: " + "; ".join(parts)

    def _chain_words(self) -> str:
        """E.g. ``keys and values shared: layer 2 reads layer 1's``."""
        reads = "; ".join(
            f"layer{'s' if len(readers) > 1 else ''} {', '.join(map(str, readers))} "
            f"read{'' if len(readers) > 1 else 's'} layer {source}'s"
            for source, readers in sorted(self._chains.items())
        )
        return f"keys and values shared: {reads}"
