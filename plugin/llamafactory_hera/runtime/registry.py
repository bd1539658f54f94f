"""The methods the patches serve, as the plugin registers them: the patches import no method. The start-up hook
registers a source of the declared methods, called at each lookup (a process that never asks imports none). Imports
nothing.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from typing import Any

_sources: list[Callable[[], Iterable[Any]]] = []


def register_methods(source: Callable[[], Iterable[Any]]) -> None:
    if source not in _sources:
        _sources.append(source)


def registered_methods() -> tuple[Any, ...]:
    return tuple(method for source in _sources for method in source())


def method_for_stage(stage: Any) -> Any:
    """The method ``stage`` selects, or None (a LLaMA-Factory stage)."""
    return next((method for method in registered_methods() if method.owns(stage)), None)


def method_of_key(key: Any) -> Any:
    """The method whose prefix ``key`` carries, or None (a LLaMA-Factory key)."""
    return next((method for method in registered_methods() if str(key).startswith(method.prefix)), None)
