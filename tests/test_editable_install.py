"""``pip install -e .`` works: the editable wheel imports ``llamafactory_hera`` from the checkout.

The wheels are built with hatchling's own PEP 517/660 hooks (``build_editable`` / ``build_wheel``, what pip
calls), offline, from a copy of the files the build reads; the editable wheel is unpacked into a fresh
site folder that a ``python -S`` process adds with ``site.addsitedir``, as pip's install would be read.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILD_INPUTS = ("pyproject.toml", "hatch_build.py", "README.md", "llamafactory_hera.pth", "editable", "plugin",
                "patches")


def _sources() -> dict[str, str]:
    """pyproject's wheel renaming, as package name -> checkout folder: {"llamafactory_hera": "plugin", ...}."""
    wheel = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"]["wheel"]
    return {target.replace("/", "."): folder for folder, target in wheel["sources"].items()}


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    root = tmp_path / "checkout"
    root.mkdir()
    for name in BUILD_INPUTS:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, root / name)
    return root


def _build(checkout: Path, kind: str, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    code = f"from hatchling.build import build_{kind}; print(build_{kind}({str(out)!r}))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=checkout, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out / proc.stdout.strip().splitlines()[-1]


def test_the_editable_finder_maps_what_the_wheel_renames() -> None:
    namespace: dict[str, object] = {"__file__": str(ROOT / "editable" / "_llamafactory_hera_editable.py")}
    exec(compile((ROOT / "editable" / "_llamafactory_hera_editable.py").read_text(), "finder", "exec"), namespace)
    try:
        packages = {name: Path(folder) for name, folder in namespace["PACKAGES"].items()}  # type: ignore[union-attr]
    finally:
        sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != "SourceMapFinder"]
    assert packages == {name: ROOT / folder for name, folder in _sources().items()}
    assert set(_sources()) == {"llamafactory_hera", "llamafactory_hera.patches"}


def test_editable_install_imports_the_checkout_and_runs_the_start_up_hook(checkout: Path, tmp_path: Path) -> None:
    wheel = _build(checkout, "editable", tmp_path / "dist")
    site_dir = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(site_dir)
    assert {"_llamafactory_hera.pth", "_llamafactory_hera_editable.pth", "llamafactory_hera.pth"} <= names
    assert not any(name.startswith("llamafactory_hera/") for name in names)  # no copy of the sources
    # an edit after the install: a new module is importable at once
    (checkout / "plugin" / "edited_after_install.py").write_text("VALUE = 42\n")
    probe = (
        "import site, sys, json; site.addsitedir(sys.argv[1]); sys.path.append(sys.argv[2]);"
        "import llamafactory_hera, llamafactory_hera.patches, llamafactory_hera.anatomy.heads, llamafactory_hera.cli;"
        "from llamafactory_hera import edited_after_install;"
        "print(json.dumps({'package': llamafactory_hera.__file__, 'patches': llamafactory_hera.patches.__file__,"
        "'heads': llamafactory_hera.anatomy.heads.__file__, 'edited': edited_after_install.VALUE,"
        "'finders': [type(f).__name__ for f in sys.meta_path]}))"
    )
    env = {k: v for k, v in os.environ.items() if k != "LLAMAFACTORY_HERA_DISABLE"}
    # dependencies (torch, yaml) from this environment's site-packages as a plain path entry: its .pth files,
    # among them the installed copy's start-up hook, are not run
    proc = subprocess.run([sys.executable, "-S", "-c", probe, str(site_dir), sysconfig.get_paths()["purelib"]],
                          capture_output=True, text=True,
                          timeout=120, env={**env, "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr[-4000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(seen["package"]) == checkout / "plugin" / "__init__.py"
    assert Path(seen["patches"]) == checkout / "patches" / "__init__.py"
    assert Path(seen["heads"]) == checkout / "plugin" / "anatomy" / "heads.py"
    assert seen["edited"] == 42
    assert "_PostImportFinder" in seen["finders"]  # llamafactory_hera.pth ran: stage: hera is registered


def test_the_standard_wheel_is_built_as_before(checkout: Path, tmp_path: Path) -> None:
    with zipfile.ZipFile(_build(checkout, "wheel", tmp_path / "dist")) as archive:
        names = set(archive.namelist())
    expected = {"llamafactory_hera.pth"}
    for package, folder in _sources().items():
        prefix = package.replace(".", "/")
        for path in (ROOT / folder).rglob("*.py"):
            if "__pycache__" not in path.parts:
                expected.add(f"{prefix}/{path.relative_to(ROOT / folder).as_posix()}")
    code = {name for name in names if name.endswith((".py", ".pth"))}
    assert code == expected, (code ^ expected)
    assert not any("editable" in name or "hatch_build" in name for name in names)
