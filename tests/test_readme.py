"""The README stays true: its key table matches HeraArguments, CI runs its test command, the demo works."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import REPO, offline_env
from llamafactory_hera import demo
from llamafactory_hera.args import HeraArguments
from llamafactory_hera.fixtures import TinyAssets

README = (REPO / "README.md").read_text(encoding="utf-8")


def _section(title_prefix: str) -> str:
    """Text of the README section whose ``## `` heading starts with ``title_prefix``."""
    match = re.search(rf"^## {re.escape(title_prefix)}.*?$(.*?)(?=^## |\Z)", README, flags=re.M | re.S)
    assert match, f"README has no section '## {title_prefix}...'"
    return match.group(1)


def _table_rows() -> dict[str, list[str]]:
    """Rows of the reference table: key -> [default, allowed values, meaning] (cells stripped)."""
    rows: dict[str, list[str]] = {}
    for line in _section("Reference").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0].startswith("`hera_"):
            key = cells[0].strip("`")
            assert key not in rows, f"{key} is listed twice"
            rows[key] = cells[1:]
    return rows


def _default(spec: Any) -> Any:
    return spec.default_factory() if spec.default is MISSING else spec.default


def _bash_lines() -> list[str]:
    """Every line of the README's ```bash blocks (comments dropped)."""
    blocks = re.findall(r"^```bash\n(.*?)^```", README, flags=re.M | re.S)
    return [line.split("#")[0].strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_reference_table_lists_every_key_with_default_and_range() -> None:
    rows = _table_rows()
    specs = {spec.name: spec for spec in fields(HeraArguments)}
    assert list(rows) == list(specs), "the table must list exactly the HeraArguments keys, in declaration order"
    for name, spec in specs.items():
        default_cell, allowed, meaning = rows[name]
        assert yaml.safe_load(default_cell.strip("`")) == _default(spec), f"{name}: default cell {default_cell!r}"
        assert meaning, f"{name}: empty meaning"
        meta = spec.metadata
        for choice in meta.get("choices", ()):
            assert f"`{choice}`" in allowed, f"{name}: allowed values miss {choice!r}"
        if "min" in meta:
            bound = re.search(r">=\s*(-?[0-9.]+)", allowed)
            assert bound and float(bound.group(1)) == meta["min"], f"{name}: range should say >= {meta['min']}"
        if "min_exclusive" in meta:
            bound = re.search(r"(?<![>=])>\s*(-?[0-9.]+)", allowed)
            assert bound and float(bound.group(1)) == meta["min_exclusive"], f"{name}: range should say > ..."
        if _default(spec) is None:
            assert "`null`" in allowed, f"{name}: null must be listed as allowed"


def test_ci_runs_exactly_the_readme_test_command() -> None:
    commands = [line for line in _bash_lines() if line.startswith("python3 dev.py test")]
    assert commands == ["python3 dev.py test"], commands
    ci = REPO / ".ci" / "run"
    assert os.access(ci, os.X_OK), ".ci/run must be executable"
    lines = [line.strip() for line in ci.read_text(encoding="utf-8").splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    assert "set -euo pipefail" in lines
    assert [line for line in lines if "dev.py" in line] == commands
    assert lines[-1] == commands[0]


def test_readme_demo_command_and_module_help() -> None:
    assert "python3 dev.py demo" in _bash_lines()
    proc = subprocess.run([sys.executable, "-m", "llamafactory_hera.demo", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for option in ("--output", "--family", "--steps", "--overwrite"):
        assert option in proc.stdout


def test_demo_refuses_to_overwrite_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / demo.RUN_DIR_NAME
    run_dir.mkdir()
    (run_dir / "keep.txt").write_text("earlier run", encoding="utf-8")
    assert demo.main(["--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(run_dir.resolve()) in err and "--overwrite" in err
    assert (run_dir / "keep.txt").is_file()
    demo.prepare_run_dir(run_dir, overwrite=True)
    assert not run_dir.exists()


def test_demo_runs_end_to_end(assets: TinyAssets, tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "llamafactory_hera.demo", "--output", str(out), "--assets", str(assets.root),
         "--steps", "3", "--quiet"],
        env=offline_env(tmp_path), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    run_dir = out / demo.RUN_DIR_NAME
    assert "trainer_log.jsonl" in proc.stdout
    assert "(missing)" not in proc.stdout, proc.stdout
    assert re.search(r"hera_loss\s+[0-9.]+ -> [0-9.]+", proc.stdout), proc.stdout
    assert "stage=sft" in proc.stdout
    assert (run_dir / "training_hera_loss.png").is_file()
    recipe = yaml.safe_load((out / demo.RECIPE_NAME).read_text(encoding="utf-8"))
    assert recipe["stage"] == "hera" and recipe["max_steps"] == 3
