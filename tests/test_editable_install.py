"""``pip install -e .`` is hatchling's ordinary editable install: a path entry for ``plugin/`` and ``patches/``.

The package folders carry the package names (``plugin/llamafactory_hera``, ``patches/llamafactory_hera_patches``),
so static tools (pyright, an IDE, an import graph) resolve every import in the checkout, and the editable wheel
needs no import hook of its own. The wheels are built with hatchling's PEP 517/660 hooks (``build_editable`` /
``build_wheel``, what pip calls), offline, from a copy of the files the build reads; the editable wheel is
unpacked into a fresh site folder that a ``python -S`` process adds with ``site.addsitedir``, as pip's install
would be read.
"""

from __future__ import annotations

import ast
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
# testing/ (the test support) is copied too: the wheels must leave it out
BUILD_INPUTS = ("pyproject.toml", "README.md", "llamafactory_hera.pth", "plugin", "patches", "testing")


def _packages() -> dict[str, str]:
    """pyproject's wheel packages, as import name -> checkout folder: {"llamafactory_hera": "plugin/...", ...}."""
    wheel = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"]["wheel"]
    return {Path(folder).name: folder for folder in wheel["packages"]}


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


def test_every_package_folder_has_the_package_name_and_every_sub_package_is_regular() -> None:
    assert _packages() == {"llamafactory_hera": "plugin/llamafactory_hera",
                           "llamafactory_hera_patches": "patches/llamafactory_hera_patches"}
    wheel = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"]["wheel"]
    assert "sources" not in wheel and "dev-mode-dirs" not in wheel and "hooks" not in wheel
    assert not (ROOT / "editable").exists() and not (ROOT / "hatch_build.py").exists()
    for folder in _packages().values():
        for directory in [ROOT / folder, *(p for p in (ROOT / folder).rglob("*") if p.is_dir())]:
            if directory.name != "__pycache__" and any(directory.glob("*.py")):
                assert (directory / "__init__.py").is_file(), f"{directory} is not a regular package"


def test_every_first_party_import_resolves_to_a_file_of_the_checkout() -> None:
    """What a static tool does: each ``llamafactory_hera*`` import names a module or package folder on disk."""
    roots = {name: ROOT / folder for name, folder in _packages().items()}
    unresolved: list[str] = []
    arrows: set[tuple[str, str]] = set()
    for folder in roots.values():
        for path in folder.rglob("*.py"):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                         else [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level
                         else [])
                for name in names:
                    top, *rest = name.split(".")
                    if top not in roots:
                        continue
                    target = roots[top].joinpath(*rest)
                    if not (target.with_suffix(".py").is_file() or (target / "__init__.py").is_file()):
                        unresolved.append(f"{path.relative_to(ROOT)}: {name}")
                    source_part = path.relative_to(folder).parts[0].removesuffix(".py")
                    arrows.add((f"{folder.name}.{source_part}", ".".join([top, *rest[:1]])))
    assert not unresolved, unresolved
    assert len({arrow for arrow in arrows if arrow[0] != arrow[1]}) > 20  # the import graph has its arrows


def test_editable_install_imports_the_checkout_and_runs_the_start_up_hook(checkout: Path, tmp_path: Path) -> None:
    wheel = _build(checkout, "editable", tmp_path / "dist")
    site_dir = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(site_dir)
    path_files = sorted(name for name in names if name.endswith(".pth") and name != "llamafactory_hera.pth")
    assert "llamafactory_hera.pth" in names and len(path_files) == 1, names
    # site runs .pth files in name order: the path entries before the start-up hook, which imports the package
    assert path_files[0] < "llamafactory_hera.pth"
    path_entries = archive_text(wheel, path_files[0]).split()
    assert sorted(Path(entry) for entry in path_entries) == [checkout / "patches", checkout / "plugin"]
    assert not any(name.startswith("llamafactory_hera/") for name in names)  # no copy of the sources
    # an edit after the install: a new module is importable at once
    (checkout / "plugin" / "llamafactory_hera" / "edited_after_install.py").write_text("VALUE = 42\n")
    probe = (
        "import site, sys, json; site.addsitedir(sys.argv[1]); sys.path.append(sys.argv[2]);"
        "import llamafactory_hera, llamafactory_hera_patches, llamafactory_hera.heads.geometry, llamafactory_hera.cli;"
        "from llamafactory_hera import edited_after_install;"
        "print(json.dumps({'package': llamafactory_hera.__file__, 'patches': llamafactory_hera_patches.__file__,"
        "'heads': llamafactory_hera.heads.geometry.__file__, 'edited': edited_after_install.VALUE,"
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
    assert Path(seen["package"]) == checkout / "plugin" / "llamafactory_hera" / "__init__.py"
    assert Path(seen["patches"]) == checkout / "patches" / "llamafactory_hera_patches" / "__init__.py"
    assert Path(seen["heads"]) == checkout / "plugin" / "llamafactory_hera" / "heads" / "geometry.py"
    assert seen["edited"] == 42
    assert "_PostImportFinder" in seen["finders"]  # llamafactory_hera.pth ran: stage: hera is registered


def test_the_standard_wheel_is_built_as_before(checkout: Path, tmp_path: Path) -> None:
    with zipfile.ZipFile(_build(checkout, "wheel", tmp_path / "dist")) as archive:
        names = set(archive.namelist())
    expected = {"llamafactory_hera.pth"}
    for package, folder in _packages().items():
        prefix = package
        for path in (ROOT / folder).rglob("*.py"):
            if "__pycache__" not in path.parts:
                expected.add(f"{prefix}/{path.relative_to(ROOT / folder).as_posix()}")
    code = {name for name in names if name.endswith((".py", ".pth"))}
    assert code == expected, (code ^ expected)
    texts = {f"{package}/{path.relative_to(ROOT / folder).as_posix()}" for package, folder in _packages().items()
             for path in (ROOT / folder).rglob("panel_texts.yaml")}
    assert len(texts) == 4 and texts <= names  # the LlamaBoard panels' texts ship beside their declarations
    assert not any("llamafactory_hera_testing" in name for name in names)  # the test support is not installed
    assert not any("editable" in name for name in names)


def archive_text(wheel: Path, name: str) -> str:
    """One file of a wheel, as text."""
    with zipfile.ZipFile(wheel) as archive:
        return archive.read(name).decode()
