"""The demos' output folders: one per method under the root, each replaced only by its own demo."""

from __future__ import annotations

import shutil
from pathlib import Path

MARKER_NAME = ".llamafactory_hera_demo"
RUN_DIR_NAME = "run"
RECIPE_NAME = "recipe.yaml"
LOG_NAME = "train.log"


class DemoError(RuntimeError):
    """A problem the user can fix; printed as one line without a traceback."""


def _remove(folder: Path, names: tuple[str, ...]) -> list[str]:
    """Remove each of ``names`` in ``folder`` (file, link or folder); return those removed."""
    removed = []
    for name in names:
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


def prepare_folder(folder: Path, own_outputs: tuple[str, ...], overwrite: bool) -> list[str]:
    """Make room for a new run in a method's ``folder``; return the earlier outputs removed. A folder the demo did not
    make keeps all but ``run/``, which is refused unless ``overwrite``."""
    run_dir = folder / RUN_DIR_NAME
    mine = (folder / MARKER_NAME).is_file()
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())) and not (overwrite or mine):
        raise DemoError(
            f"{run_dir} already exists, is not empty and was not made by the demo; pass --overwrite "
            "to replace it, or choose another --output."
        )
    return _remove(folder, own_outputs if mine else (RUN_DIR_NAME,))


def mark(folder: Path, what: str) -> None:
    """Create ``folder`` with the marker saying what the demo keeps there."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER_NAME).write_text(f"made by python -m llamafactory_hera.demo; {what}\n", encoding="utf-8")
