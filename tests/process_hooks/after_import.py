"""Test-only: patch a module once a process has imported it, not at start-up (tests/engine_evidence/,
tests/fsdp_cpu/). A launcher process (``torchrun``, ``accelerate launch``) imports no transformers: importing
``transformers.trainer`` there to patch it cost ~10 CPU s per run."""

import importlib.abc
import importlib.util
import sys
from collections.abc import Callable
from types import ModuleType


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds the modules of ``patches`` through the other finders, and patches each once it has executed."""

    def __init__(self, patches: dict[str, Callable[[ModuleType], None]]) -> None:
        self.patches = patches

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.patches:
            return None
        sys.meta_path.remove(self)  # the real spec, from the finders after this one
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is not None and spec.loader is not None:
            execute = spec.loader.exec_module  # this module's own loader object: patched for it alone

            def exec_module(module, execute=execute, patch=self.patches[fullname]):
                execute(module)
                patch(module)

            spec.loader.exec_module = exec_module
        return spec


def patch_after_import(patches: dict[str, Callable[[ModuleType], None]]) -> None:
    """Each ``patches[name](module)`` runs right after ``name`` executes (at once if it already has)."""
    waiting = {}
    for name, patch in patches.items():
        if name in sys.modules:
            patch(sys.modules[name])
        else:
            waiting[name] = patch
    if waiting:
        sys.meta_path.insert(0, _AfterImport(waiting))
