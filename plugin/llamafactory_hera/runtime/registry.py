"""The methods the patches serve, as the plugin registers them: the patches import no method.

The start-up hook registers, before any patch, a source of the declared methods, called at each lookup (a process that
never asks imports no declaration). The patches use a method by its declaration's fields (``recipe.declaration``), a run
by its phases (``recipe.run``). Imports nothing.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from typing import Any

_sources: list[Callable[[], Iterable[Any]]] = []


def register_methods(source: Callable[[], Iterable[Any]]) -> None:
    """Register ``source`` (a callable returning method declarations); again: no change."""
    if source not in _sources:
        _sources.append(source)


def registered_methods() -> tuple[Any, ...]:
    """Every registered method, in declaration order."""
    return tuple(method for source in _sources for method in source())


def method_for_stage(stage: Any) -> Any:
    """The method ``stage`` selects, or None (a LLaMA-Factory stage)."""
    return next((method for method in registered_methods() if method.owns(stage)), None)


def method_of_key(key: Any) -> Any:
    """The method whose prefix ``key`` carries, or None (a LLaMA-Factory key)."""
    return next((method for method in registered_methods() if str(key).startswith(method.prefix)), None)
