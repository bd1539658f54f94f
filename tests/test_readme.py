"""The README stays true: its key table matches HeraArguments, CI runs its test command, the demo works."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import REPO, offline_env
from llamafactory_hera import demo
from llamafactory_hera.demo_console import ProgressFilter
from llamafactory_hera.fixtures import TinyAssets
from llamafactory_hera.hera.args import HeraArguments

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


def test_dev_test_runs_pytest_on_every_core_unless_told_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("hera_dev", REPO / "dev.py")
    dev = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dev)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert dev.parallel_args([]) == ["-n", "2", "--dist", "worksteal"]
    assert dev.parallel_args(["-k", "numerics", "-x"]) == ["-n", "2", "--dist", "worksteal"]
    for chosen in (["-n", "0"], ["-n4"], ["--numprocesses=3"], ["-p", "no:xdist"]):
        assert dev.parallel_args(chosen) == [], chosen
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert dev.parallel_args([]) == []


def test_documents_the_repository_points_to_are_in_it() -> None:
    """constraints-torch.txt once sent readers to a HOST.md that only existed outside the repository."""
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    sources = ["README.md", "constraints-torch.txt", "pyproject.toml", "Makefile", "dev.py", *[
        name for name in tracked if name.endswith((".md", ".txt", ".yaml", ".sh")) and not name.startswith("tests/")]]
    named = {(source, ref) for source in sources if (REPO / source).is_file()
             for ref in re.findall(r"(?<![\w/:.-])([\w./-]+\.md)\b", (REPO / source).read_text(encoding="utf-8"))}
    assert named, "no document references found: the pattern is broken"
    missing = [(source, ref) for source, ref in sorted(named)
               if not ((REPO / ref).is_file() or (REPO / source).parent.joinpath(ref).is_file())]
    assert missing == []


def test_readme_install_section_works_without_pypi() -> None:
    """The package is not on PyPI: the README must not tell users to `pip install llamafactory-hera`."""
    install = README.split("## Install", 1)[1].split("\n## ", 1)[0]
    assert "pip install llamafactory-hera" not in install
    assert "pip install ." in install and "pip install -e ." in install and "pip wheel" in install


def test_readme_demo_command_and_module_help() -> None:
    assert "python3 dev.py demo" in _bash_lines()
    proc = subprocess.run([sys.executable, "-m", "llamafactory_hera.demo", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for option in ("--output", "--family", "--steps", "--overwrite"):
        assert option in proc.stdout


def test_demo_refuses_a_run_folder_it_did_not_make(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / demo.RUN_DIR_NAME
    run_dir.mkdir()
    (run_dir / "keep.txt").write_text("earlier run", encoding="utf-8")
    assert demo.main(["--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(run_dir.resolve()) in err and "--overwrite" in err and "not made by the demo" in err
    assert (run_dir / "keep.txt").is_file()
    (tmp_path / "notes.txt").write_text("mine", encoding="utf-8")
    assert demo.prepare_output(tmp_path, overwrite=True) == ["run"]
    assert not run_dir.exists() and (tmp_path / "notes.txt").is_file()  # only run/ goes, nothing else of the user's


def test_demo_clears_only_its_own_outputs_in_its_own_folder(tmp_path: Path) -> None:
    (tmp_path / demo.MARKER_NAME).write_text("", encoding="utf-8")
    for name in ("run", "run_sft"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x").write_text("", encoding="utf-8")
    for name in ("recipe.yaml", "train.log", "recipe_selected.yaml", "mine.txt"):
        (tmp_path / name).write_text("", encoding="utf-8")
    (tmp_path / "assets").mkdir()
    assert demo.prepare_output(tmp_path, overwrite=False) == ["run", "run_sft", "recipe.yaml", "train.log",
                                                               "recipe_selected.yaml"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([demo.MARKER_NAME, "assets", "mine.txt"])


def test_progress_filter_shows_plugin_lines_and_one_line_per_step() -> None:
    shown: list[str] = []
    progress = ProgressFilter(2, shown.append)
    raw = ("[INFO|trainer.py:1] 2026 >> ***** Running training *****\n"
           "[llamafactory-hera] HeRA: heads [L1H0]; k 3\n"
           "  0%|          | 0/2 [00:00<?, ?it/s] 50%|#####     | 1/2 [00:01<00:01,  1.0s/it]      "
           "{'loss': '6.238', 'grad_norm': '1.4', 'lm_loss': '6.218', 'hera_loss': '1.94', "
           "'hera_temperature': '0.07007', 'epoch': '0.25'}\r 100%|##########| 2/2 "
           "{'loss': '6.1', 'lm_loss': '6.0', 'hera_loss': '1.7', 'epoch': '0.5'}\n"
           "{'train_runtime': '11.2', 'train_loss': '5.785'}\nwarning [llamafactory-hera] no image in 3 batches")
    for start in range(0, len(raw), 7):  # chunk boundaries fall anywhere, also inside a dictionary
        progress.feed(raw[start:start + 7])
    progress.close()
    assert shown == [
        "[llamafactory-hera] HeRA: heads [L1H0]; k 3",
        "[demo] step 1/2  loss 6.238  lm_loss 6.218  hera_loss 1.94  tau 0.07007",
        "[demo] step 2/2  loss 6.1  lm_loss 6.0  hera_loss 1.7",
        "[llamafactory-hera] no image in 3 batches",
    ]


def _run_demo(out: Path, assets: TinyAssets, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "llamafactory_hera.demo", "--output", str(out), "--assets", str(assets.root), *extra],
        env=offline_env(tmp_path), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_demo_runs_end_to_end_twice_and_its_next_steps_work(assets: TinyAssets, tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = _run_demo(out, assets, tmp_path, "--steps", "3")
    run_dir = out / demo.RUN_DIR_NAME
    lines = proc.stdout.splitlines()
    assert len(lines) < 50, proc.stdout  # progress and summary, not LLaMA-Factory's ~700 lines
    assert "Saving model checkpoint" in (out / demo.LOG_NAME).read_text(encoding="utf-8")  # ... which are here
    assert [line.split("  ")[0] for line in lines if line.startswith("[demo] step")] == [
        "[demo] step 1/3", "[demo] step 2/3", "[demo] step 3/3"]
    assert any(line.startswith("[llamafactory-hera] HeRA: heads [L1H0, L1H2]") for line in lines)
    assert "trainer_log.jsonl" in proc.stdout and "(missing)" not in proc.stdout, proc.stdout
    assert re.search(r"hera_loss\s+[0-9.]+ -> [0-9.]+", proc.stdout), proc.stdout
    plots = sorted(run_dir.glob("*.png"))
    assert {"training_loss.png", "training.png"} <= {p.name for p in plots}
    assert f"Plots ({len(plots)}):" in proc.stdout and all(str(p) in proc.stdout for p in plots)
    assert "stage=sft" in proc.stdout and "--report" in proc.stdout
    recipe = yaml.safe_load((out / demo.RECIPE_NAME).read_text(encoding="utf-8"))
    assert recipe["stage"] == "hera" and recipe["max_steps"] == 3

    select = next(line.strip() for line in lines if " select " in line and "--output" in line)
    chosen = subprocess.run(shlex.split(select), env=offline_env(tmp_path), capture_output=True, text=True,
                            timeout=600)  # the printed next step works as printed
    assert chosen.returncode == 0, chosen.stderr[-3000:]
    assert yaml.safe_load((out / "recipe_selected.yaml").read_text(encoding="utf-8"))["hera_heads"] != ["L1H0", "L1H2"]

    again = _run_demo(out, assets, tmp_path, "--steps", "2", "--quiet")  # the README's command, a second time
    assert f"replaced the previous demo outputs in {out}: run, recipe.yaml, train.log, recipe_selected.yaml" in \
        again.stdout
    assert "[demo] step" not in again.stdout
    assert yaml.safe_load((out / demo.RECIPE_NAME).read_text(encoding="utf-8"))["max_steps"] == 2
    assert not (out / "recipe_selected.yaml").exists() and (run_dir / "adapter_model.safetensors").is_file()
