"""Test-only: the path finder of this process finds neither some top-level modules nor their distributions' metadata
(``importlib.util.find_spec`` is None, ``importlib.metadata.version`` raises ``PackageNotFoundError``), as where they
are not installed. Used by the start-up hooks (unused_packages.py beside this file, tests/without_deepspeed/)."""

import importlib.machinery
import re


def _normalized(name: str) -> str:
    """A distribution's name as its metadata folder spells it (PEP 503 normalized, ``_`` for the separators)."""
    return re.sub(r"[-_.]+", "_", name).lower()


def _name_of(dist) -> str:
    """``dist``'s normalized name from its ``*.dist-info`` / ``*.egg-info`` folder's name where it has one: parsing
    each METADATA file instead cost about 0.4 CPU s per process, since ``importlib.metadata.entry_points()`` walks every
    installed distribution (transformers and LLaMA-Factory call it at import)."""
    folder = getattr(dist, "_path", None)  # PathDistribution's folder
    if folder is not None and folder.suffix in {".dist-info", ".egg-info"}:
        return _normalized(folder.name.removesuffix(folder.suffix).partition("-")[0])  # name-version.dist-info
    return _normalized(dist.metadata["Name"] or "")


def hide(names: tuple[str, ...]) -> None:
    """Hide the top-level modules and distributions ``names`` (each call wraps the finder as it is: calls compose)."""
    finder = importlib.machinery.PathFinder
    hidden = {_normalized(name) for name in names}
    find_spec, find_distributions = finder.find_spec, finder.find_distributions

    def _spec(cls, fullname, path=None, target=None):
        return None if fullname.partition(".")[0] in names else find_spec(fullname, path, target)

    def _distributions(*args, **kwargs):
        return (dist for dist in find_distributions(*args, **kwargs)
                if _name_of(dist) not in hidden)

    # a classmethod, as PathFinder's own: pytest keeps ``PathFinder.find_spec`` as a class attribute of its import
    # hook and calls it through its instance, which a plain function would take as ``fullname``
    finder.find_spec = classmethod(_spec)
    finder.find_distributions = staticmethod(_distributions)
