"""Test-only: the path finder of this process finds neither some top-level modules nor their distributions' metadata
(``importlib.util.find_spec`` is None, ``importlib.metadata.version`` raises ``PackageNotFoundError``), as where they
are not installed. Used by the start-up hooks (unused_packages.py beside this file, tests/without_deepspeed/)."""

import importlib.machinery


def hide(names: tuple[str, ...]) -> None:
    """Hide the top-level modules and distributions ``names`` (each call wraps the finder as it is: calls compose)."""
    finder = importlib.machinery.PathFinder
    find_spec, find_distributions = finder.find_spec, finder.find_distributions

    def _spec(cls, fullname, path=None, target=None):
        return None if fullname.partition(".")[0] in names else find_spec(fullname, path, target)

    def _distributions(*args, **kwargs):
        return (dist for dist in find_distributions(*args, **kwargs)
                if (dist.metadata["Name"] or "").lower() not in names)

    # a classmethod, as PathFinder's own: pytest keeps ``PathFinder.find_spec`` as a class attribute of its import
    # hook and calls it through its instance, which a plain function would take as ``fullname``
    finder.find_spec = classmethod(_spec)
    finder.find_distributions = staticmethod(_distributions)
