"""Import hook of an editable install (``pip install -e .``): ``llamafactory_hera`` from this checkout.

The wheel renames folders (pyproject's ``[tool.hatch.build.targets.wheel.sources]``): ``plugin/`` is
the package ``llamafactory_hera`` and ``patches/`` its sub-package ``llamafactory_hera.patches``. A
path entry cannot express that, so an editable install puts this folder on ``sys.path``
(``dev-mode-dirs``) and ``_llamafactory_hera_editable.pth`` imports this module, which registers a
finder for exactly those two names; every other module below them is found in the checkout by
Python's own path finder. Edits to ``plugin/`` and ``patches/`` take effect at the next import.

Like ``llamafactory_hera._bootstrap`` this runs at every interpreter start: it imports nothing
beyond what ``site`` has loaded until one of the two names is imported.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# package name -> folder of the checkout (kept equal to pyproject's sources by tests/test_editable_install.py)
PACKAGES = {
    "llamafactory_hera": os.path.join(ROOT, "plugin"),
    "llamafactory_hera.patches": os.path.join(ROOT, "patches"),
}


class SourceMapFinder:
    """Meta-path finder: the two renamed packages, from their folders in the checkout."""

    def find_spec(self, fullname: str, path=None, target=None):
        folder = PACKAGES.get(fullname)
        if folder is None:
            return None
        import importlib.util

        return importlib.util.spec_from_file_location(fullname, os.path.join(folder, "__init__.py"),
                                                      submodule_search_locations=[folder])

    def invalidate_caches(self) -> None:
        pass


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once)."""
    if not any(type(finder).__name__ == SourceMapFinder.__name__ for finder in sys.meta_path):
        sys.meta_path.insert(0, SourceMapFinder())


install()
