"""Every override is marked ``@override`` (typing_extensions' or typing's): each class of the plugin and the patches,
imported, against its bases' attributes. A method a base defines too (a TrainerCallback's ``on_*``, an ``nn.Module``'s
``forward``, an autograd Function's ``backward``, a base run's phase) and is not marked fails, named."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from types import ModuleType
from typing import Any

from typing_extensions import override

import llamafactory_hera
import llamafactory_hera_patches

RUNS_ON_IMPORT = {"llamafactory_hera.demo.__main__"}  # a script: importing it runs the demo


def _modules() -> list[ModuleType]:
    found = []
    for package in (llamafactory_hera, llamafactory_hera_patches):
        for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            if info.name not in RUNS_ON_IMPORT:
                found.append(importlib.import_module(info.name))
    return found


def _marked(attribute: Any) -> bool:
    """Marked on the function itself or on its wrapper (a staticmethod, a classmethod, a property's getter)."""
    inner = [attribute, getattr(attribute, "__func__", None), getattr(attribute, "fget", None)]
    return any(getattr(candidate, "__override__", False) for candidate in inner)


def _method(name: str, attribute: Any) -> bool:
    """A method of the class's own: not a dunder (``__init__``: every class has one) nor an enum's ``_sunder_``."""
    if name.startswith("_") and name.endswith("_"):
        return False
    return inspect.isfunction(attribute) or isinstance(attribute, staticmethod | classmethod | property)


def unmarked(classes: list[type]) -> list[str]:
    """``module.Class.method`` of each override in ``classes`` not marked, with the base it overrides."""
    found = []
    for cls in classes:
        for name, attribute in vars(cls).items():
            bases = [base for base in cls.__mro__[1:] if base is not object and name in vars(base)]
            if bases and _method(name, attribute) and not _marked(attribute):
                found.append(f"{cls.__module__}.{cls.__qualname__}.{name} (overrides {bases[0].__qualname__}'s)")
    return found


def test_every_override_in_the_package_is_marked() -> None:
    classes = [cls for module in _modules() for cls in vars(module).values()
               if inspect.isclass(cls) and cls.__module__ == module.__name__]
    assert len(classes) > 100  # the walk reaches the package
    assert unmarked(classes) == []


def test_an_unmarked_override_is_found() -> None:
    class Base:
        def step(self) -> None: ...

        @property
        def size(self) -> int:
            return 0

    class Marked(Base):
        @override
        def step(self) -> None: ...

        @property
        @override
        def size(self) -> int:
            return 1

    class Unmarked(Base):
        def step(self) -> None: ...

        def own(self) -> None: ...

    assert unmarked([Marked]) == []
    assert unmarked([Unmarked]) == [f"{__name__}.{Unmarked.__qualname__}.step (overrides {Base.__qualname__}'s)"]
