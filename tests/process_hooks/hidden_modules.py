"""Test-only: the path finder of this process finds neither some top-level modules nor their distributions' metadata
(``importlib.util.find_spec`` is None, ``importlib.metadata.version`` raises ``PackageNotFoundError``), as where they
are not installed. Used by the start-up hooks (unused_packages.py beside this file, tests/without_deepspeed/)."""

import importlib.machinery
from importlib.metadata import Prepared


def hide(names: tuple[str, ...]) -> None:
    """Hide the top-level modules and distributions ``names`` (each call wraps the finder as it is: calls compose)."""
    finder = importlib.machinery.PathFinder
    hidden = {Prepared.normalize(name) for name in names}
    find_spec, find_distributions = finder.find_spec, finder.find_distributions

    def _spec(cls, fullname, path=None, target=None):
        return None if fullname.partition(".")[0] in names else find_spec(fullname, path, target)

    def _distributions(*args, **kwargs):
        # the standard library's own name, from the dist-info folder where it can (what entry_points() dedups
        # by): reading each METADATA instead cost about 0.4 CPU s per process, since entry_points() walks all ~220
        # installed distributions and LLaMA-Factory's import calls it three times
        return (dist for dist in find_distributions(*args, **kwargs) if dist._normalized_name not in hidden)

    # a classmethod, as PathFinder's own: pytest keeps ``PathFinder.find_spec`` as a class attribute of its import
    # hook and calls it through its instance, which a plain function would take as ``fullname``
    finder.find_spec = classmethod(_spec)
    finder.find_distributions = staticmethod(_distributions)
