"""Test-only start-up hook: this interpreter has no DeepSpeed, as where it is not installed (the README's environment).

Put this folder first on ``PYTHONPATH``: the path finder then finds neither the ``deepspeed`` package nor its
distribution's metadata (``importlib.util.find_spec`` is None, ``importlib.metadata.version`` raises
``PackageNotFoundError``), while the test environment keeps its DeepSpeed for the ZeRO tests.
tests/test_torchrun_refusals.py uses it.
"""

import importlib.machinery

_PathFinder = importlib.machinery.PathFinder
_find_spec = _PathFinder.find_spec
_find_distributions = _PathFinder.find_distributions


def _hidden(name: str) -> bool:
    return name == "deepspeed" or name.startswith("deepspeed.")


def _spec(cls, fullname, path=None, target=None):
    return None if _hidden(fullname) else _find_spec(fullname, path, target)


def _distributions(*args, **kwargs):
    return (dist for dist in _find_distributions(*args, **kwargs)
            if (dist.metadata["Name"] or "").lower() != "deepspeed")


_PathFinder.find_spec = classmethod(_spec)  # as PathFinder's own (tests/process_hooks/eval_extra_hidden.py)
_PathFinder.find_distributions = staticmethod(_distributions)
