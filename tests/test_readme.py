"""The README stays true: CI runs its test command, its install commands need no PyPI, the demo works.

The methods' key tables are in docs/ and checked by tests/hera/test_hera_docs.py, tests/rah/test_rah_docs.py and
tests/harc/test_harc_docs.py; the front page and every link by tests/test_docs.py."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from dist_runs import run_python

from conftest import REPO, offline_env
from llamafactory_hera.demo import folders
from llamafactory_hera.demo import hera as hera_demo
from llamafactory_hera.demo.cli import main as demo_main
from llamafactory_hera.demo.console import ProgressFilter
from llamafactory_hera.fixtures import TinyAssets

README = (REPO / "README.md").read_text(encoding="utf-8")


def _bash_lines() -> list[str]:
    """Every line of the README's ```bash blocks (comments dropped)."""
    blocks = re.findall(r"^```bash\n(.*?)^```", README, flags=re.M | re.S)
    return [line.split("#")[0].strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_ci_runs_exactly_the_readme_test_command() -> None:
    """The README's first test command is CI's (every stack); the others are a stack each."""
    commands = [line for line in _bash_lines() if line.startswith("python3 dev.py test")]
    assert commands == ["python3 dev.py test --stack all", "python3 dev.py test", "python3 dev.py test --stack oldest",
                        "python3 dev.py test --stack main"]
    commands = commands[:1]
    ci = REPO / ".ci" / "run"
    assert os.access(ci, os.X_OK), ".ci/run must be executable"
    lines = [line.strip() for line in ci.read_text(encoding="utf-8").splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    assert "set -euo pipefail" in lines
    assert [line for line in lines if "dev.py" in line] == commands
    assert lines[-1] == commands[0]


def test_dev_test_runs_pytest_on_every_core_unless_told_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    dev = _dev()
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert dev.parallel_args([]) == ["-n", "3", "--dist", "worksteal"]
    assert dev.parallel_args(["-k", "numerics", "-x"]) == ["-n", "3", "--dist", "worksteal"]
    for chosen in (["-n", "0"], ["-n4"], ["--numprocesses=3"], ["-p", "no:xdist"]):
        assert dev.parallel_args(chosen) == [], chosen
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert dev.parallel_args([]) == []


def test_dev_test_asks_pytest_for_failures_as_they_happen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--instafail`` when the venv's python has pytest-instafail (the test extra), not when it lacks it or the
    caller passed it; the pytest command of ``dev.py test`` carries it."""
    dev = _dev()
    stub = tmp_path / "stub"
    stub.mkdir()
    monkeypatch.setenv("PYTHONPATH", str(stub))
    (stub / "pytest_instafail.py").write_text("", encoding="utf-8")
    python = Path(sys.executable)
    assert dev.report_args(python, ["-x"]) == ["--instafail"]
    assert dev.report_args(python, ["--instafail"]) == []
    ran: list[list[str]] = []
    monkeypatch.setattr(dev, "run", lambda cmd, env=None, check=True: ran.append([str(c) for c in cmd]) or 0)
    assert dev.cmd_test(python, ["-k", "x"]) == 0
    (pytest_command,) = [cmd for cmd in ran if cmd[1:3] == ["-m", "pytest"]]
    assert "--instafail" in pytest_command and pytest_command[-2:] == ["-k", "x"], pytest_command
    (stub / "pytest_instafail.py").write_text("raise ImportError('not installed')\n", encoding="utf-8")
    assert dev.report_args(python, []) == []


def test_a_failure_shows_while_the_run_goes_on(tmp_path: Path) -> None:
    """Under pytest-xdist with dev.py's report options, a failing test's text is printed while a later test still
    runs: that test waits (up to 10 s) until the failure's text has been read from pytest's output, so a run stopped
    early shows it too (without it an interrupted ``dev.py test`` showed no failure text)."""
    pytest.importorskip("pytest_instafail", reason="pytest-instafail (the test extra) is not installed")
    dev = _dev()
    flag = tmp_path / "failure_seen"
    (tmp_path / "test_inner.py").write_text(
        "import os, pathlib, time\n\n\ndef test_fails():\n    assert 'BOOM-31-22' == 'ok'\n\n\n"
        "def test_waits():\n    flag, deadline = pathlib.Path(os.environ['FAILURE_SEEN']), time.monotonic() + 10\n"
        "    while not flag.exists() and time.monotonic() < deadline:\n        time.sleep(0.05)\n"
        "    assert flag.exists(), 'the failure was not shown while the run went on'\n", encoding="utf-8")
    options = ["-n", "1", *dev.report_args(Path(sys.executable), ["-n", "1"])]
    env = {**os.environ, "FAILURE_SEEN": str(flag), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *options,
                             "test_inner.py"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "BOOM-31-22" in line:
            flag.touch()
    out = "".join(lines)
    assert proc.wait(timeout=120) == 1, out
    assert "1 failed, 1 passed" in out, out


def _summaries(tmp_path: Path) -> dict[str, str]:
    """What each demo prints after its run (outputs missing: only the next steps matter here)."""
    from llamafactory_hera.demo.harc import harc_summary
    from llamafactory_hera.demo.rah import rah_summary
    from llamafactory_hera.demo.runner import DemoContext

    def ctx(method: str) -> DemoContext:
        return DemoContext(output=tmp_path, folder=tmp_path / method, assets=tmp_path / "assets", family="llava",
                           steps=3, cli=tmp_path / ".venv" / "bin" / "llamafactory-cli", env={}, show="none")

    return {"hera": hera_demo.summary(ctx("hera"), 1.0), "rah": rah_summary(ctx("rah"), 1.0, "llava", "m"),
            "harc": harc_summary(ctx("harc"), 1.0, tmp_path / "m", "llama3")}


def test_readme_says_what_the_demos_run_and_print(tmp_path: Path) -> None:
    """The README's demo lines say what each demo runs and its next steps what each prints (it once
    said the HeRA demo runs ``select --report``, a next step it prints, and that every demo ends with a chat line,
    which HeRA's does not print)."""
    from markdown_docs import section

    clone = section(README, "Try it from a clone")
    demo_lines = {(re.findall(r"--method (\w+)", line) or ["hera"])[0]: line.split("#", 1)[1]
                  for line in re.findall(r"^python3 dev\.py demo.*$", clone, re.M)}
    assert "select" not in demo_lines["hera"] and "report" not in demo_lines["hera"], demo_lines["hera"]
    assert "20-step" in demo_lines["hera"] and hera_demo.DEFAULT_STEPS == 20
    steps = " ".join(re.search(r"Each ends with its\s+next steps(.*?)\n\n", clone, re.S).group(1).split())
    printed = _summaries(tmp_path)
    chat = re.search(r"([^:;]*) chat with", steps)
    says_chat = {stage for stage, name in (("hera", "HeRA"), ("rah", "RAH-LoRA"), ("harc", "HARC"))
                 if chat and re.search(rf"\b{re.escape(name)}'s", chat.group(1))}
    assert says_chat == {stage for stage, text in printed.items() if " chat " in text}, (steps, says_chat)
    hera = printed["hera"]
    for shown, said in ((" select ", "llamafactory-hera select"), (" select --report ", "select --report"),
                        ("stage=sft", "SFT twin"), (" --baseline ", "evaluate against it")):
        assert shown in hera and said in steps, (shown, said, steps)


def test_readme_says_what_the_set_up_costs_and_needs() -> None:
    """Disk of the .venv (measured on a fresh clone: 5.9 GB for the demo, 6.8 GB with the test extras), activating it
    for llamafactory-cli and the web UI, the suite's time, and the browser test's Chromium from apt-get (the
    figures as a fresh set-up measured them)."""
    from markdown_docs import section

    clone = " ".join(section(README, "Try it from a clone").split())
    for words in ("5.9 GB", "6.8 GB with the test tools", "source .venv/bin/activate", "`llamafactory-cli webui`",
                  "about 20 minutes on a 2-core machine", "Chromium with `apt-get`"):
        assert words in clone, words


def _dev() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("hera_dev", REPO / "dev.py")
    dev = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dev)
    return dev


def test_dev_demo_installs_no_test_only_package_and_test_installs_them(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo's .venv holds what a user installs (the package and its dependencies, the pinned torch trio), not
    pytest, ruff, deepspeed or playwright, nor the test support (testing/); `dev.py test` adds them (the test support
    last, after the package), also to a .venv that `dev.py demo` made."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]

    def name(requirement: str) -> str:
        return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower()

    test_only = {name(r) for r in project["optional-dependencies"]["test"]}
    assert {"pytest", "ruff", "deepspeed", "playwright"} <= test_only
    assert not test_only & {name(r) for r in project["dependencies"]}, "a test-only package is a dependency"
    dev = _dev()
    monkeypatch.setattr(dev, "VENV", tmp_path / "venv")
    dev.venv_bin("python").parent.mkdir(parents=True)
    dev.venv_bin("python").write_text("", encoding="utf-8")  # an existing .venv: reused, not created
    installs: dict[str, list[list[str]]] = {}
    for command in ("demo", "test"):
        ran: list[list[str]] = []
        monkeypatch.setattr(dev, "run",
                            lambda cmd, env=None, check=True, ran=ran: ran.append([str(c) for c in cmd]) or 0)
        monkeypatch.setattr(dev, "uv_settings", lambda python: ([], {}))
        dev.setup(command)
        installs[command] = [cmd[cmd.index("install") + 1:] for cmd in ran if "install" in cmd]
    assert [args[-1] for args in installs["demo"]] == [dev.UV, "torchaudio", ".", "."], installs["demo"]
    assert not {name(arg) for args in installs["demo"] for arg in args} & test_only
    assert not any("[test]" in arg for args in installs["demo"] for arg in args), installs["demo"]
    assert [args[-1] for args in installs["test"]] == [dev.UV, "torchaudio", ".[test]", ".", "./testing"], installs
    assert "--force-reinstall" in installs["test"][-1]  # a second run installs the current tree again


def _pip_config(tmp_path: Path, *lines: str) -> Path:
    """A stand-in ``python`` whose ``-m pip config list`` prints ``lines``."""
    python = tmp_path / "python"
    python.write_text("#!/bin/sh\ncat <<'EOF'\n" + "\n".join(lines) + "\nEOF\n", encoding="utf-8")
    python.chmod(0o755)
    return python


def test_dev_hands_pips_settings_to_uv(tmp_path: Path) -> None:
    """uv reads no pip.conf or PIP_* variable: set-up hands it pip's settings as ``pip config list`` prints them
    (each value Python's repr, so a multi-line pip.conf value holds "\\n"): index URLs (the last index-url, as pip
    takes it), find-links and constraint files each once and only where they exist (pip skips a missing file index,
    uv would stop), trusted hosts, no-index, the certificate file; another command's section is not an install's.
    A setting uv is not given (a proxy) makes set-up use pip alone."""
    wheels, constraints, cert = tmp_path / "wheels", tmp_path / "constraints.txt", tmp_path / "ca.crt"
    wheels.mkdir()
    constraints.write_text("torch<=9\n", encoding="utf-8")
    cert.write_text("", encoding="utf-8")
    lines = (f"global.constraint='{constraints}'",
             f"global.extra-index-url='\\nfile://{tmp_path}/missing\\nhttps://mirror.example/simple'",
             f"global.find-links='{wheels}'", "global.index-url='https://first.example/simple'",
             f"global.cert='{cert}'", "global.trusted-host='mirror.example'", "global.no-index='false'",
             "download.index-url='https://download-only.example/simple'", "global.default-timeout='60'",
             f":env:.find-links='{wheels}'", ":env:.index-url='https://registry.example/simple'")
    dev = _dev()
    assert dev.uv_settings(_pip_config(tmp_path, *lines)) == ([
        "--index-strategy", "unsafe-best-match", "--constraint", str(constraints),
        "--extra-index-url", "https://mirror.example/simple", "--find-links", str(wheels),
        "--allow-insecure-host", "mirror.example", "--index-url", "https://registry.example/simple"],
        {"SSL_CERT_FILE": str(cert)})
    assert dev.uv_settings(_pip_config(tmp_path, ":env:.no-index='1'"))[0][-1] == "--no-index"
    assert dev.uv_settings(_pip_config(tmp_path, *lines, "global.proxy='http://proxy.example:3128'")) is None


def test_dev_installs_with_pip_where_uv_cannot_be_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A wheelhouse without uv: set-up goes on with pip, as it does for an install that uv fails."""
    dev = _dev()
    monkeypatch.setattr(dev, "VENV", tmp_path / "venv")
    dev.venv_bin("python").parent.mkdir(parents=True)
    dev.venv_bin("python").write_text("", encoding="utf-8")
    monkeypatch.setattr(dev, "uv_settings", lambda python: ([], {}))
    for uv_fails_at in ("installer", "install"):
        ran: list[list[str]] = []

        def run(cmd: list, env: Any = None, check: bool = True, ran: list = ran, fails: str = uv_fails_at) -> int:
            ran.append([str(c) for c in cmd])
            failing = dev.UV in ran[-1] if fails == "installer" else ran[-1][0].endswith("uv")
            return 1 if failing else 0

        monkeypatch.setattr(dev, "run", run)
        dev.setup("demo")
        pip = [cmd[-1] for cmd in ran if cmd[1:4] == ["-m", "pip", "install"]]
        assert pip == [dev.UV, "torchaudio", ".", "."], (uv_fails_at, ran)


def test_documents_the_repository_points_to_are_in_it() -> None:
    """constraints-torch.txt once sent readers to a HOST.md that only existed outside the repository."""
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    sources = {"README.md", "constraints-torch.txt", "pyproject.toml", "Makefile", "dev.py",
               *(f"docs/{doc.name}" for doc in (REPO / "docs").glob("*.md")), *(
        name for name in tracked if name.endswith((".md", ".txt", ".yaml", ".sh")) and not name.startswith("tests/"))}
    named = {(source, ref) for source in sources if (REPO / source).is_file()
             for ref in re.findall(r"(?<![\w/:.-])([\w./-]+\.md)\b", (REPO / source).read_text(encoding="utf-8"))}
    assert named, "no document references found: the pattern is broken"
    outputs = {"eval_report.md"}  # files a command writes into a run folder, not documents of the repository
    missing = [(source, ref) for source, ref in sorted(named) if ref not in outputs
               and not ((REPO / ref).is_file() or (REPO / source).parent.joinpath(ref).is_file())]
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
    run_dir = tmp_path / "hera" / folders.RUN_DIR_NAME
    run_dir.mkdir(parents=True)
    (run_dir / "keep.txt").write_text("earlier run", encoding="utf-8")
    assert demo_main(["--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(run_dir.resolve()) in err and "--overwrite" in err and "not made by the demo" in err
    assert (run_dir / "keep.txt").is_file()
    (tmp_path / "hera" / "notes.txt").write_text("mine", encoding="utf-8")
    assert folders.prepare_folder(tmp_path / "hera", hera_demo.OWN_OUTPUTS, overwrite=True) == ["run"]
    assert not run_dir.exists() and (tmp_path / "hera" / "notes.txt").is_file()  # only run/ goes, nothing else


def test_demo_clears_only_its_own_outputs_in_its_own_folder(tmp_path: Path) -> None:
    folder = tmp_path / "hera"
    folders.mark(folder, "test")
    for name in ("run", "run_sft"):
        (folder / name).mkdir()
        (folder / name / "x").write_text("", encoding="utf-8")
    for name in ("recipe.yaml", "train.log", "recipe_selected.yaml", "mine.txt"):
        (folder / name).write_text("", encoding="utf-8")
    assert folders.prepare_folder(folder, hera_demo.OWN_OUTPUTS, overwrite=False) == [
        "run", "run_sft", "recipe.yaml", "train.log", "recipe_selected.yaml"]
    assert sorted(p.name for p in folder.iterdir()) == sorted([folders.MARKER_NAME, "mine.txt"])


@pytest.mark.parametrize(("argv", "message"), [
    (["--method", "rah", "--steps", "3"], "--steps 3: RAH-LoRA takes no optimizer step"),
    (["--method", "harc", "--family", "llava"], "--family llava: the harc demo runs on llama3, qwen2"),
    (["--method", "hera", "--family", "llama3"], "--family llama3: the hera demo runs on qwen3_vl"),
    (["--steps", "0"], "--steps 0: must be >= 1"),
])
def test_demo_options_a_method_cannot_take_are_one_line_errors(argv: list[str], message: str, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        demo_main([*argv, "--output", str(tmp_path)])
    assert stop.value.code == 2 and message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # refused before anything is written


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
        env=offline_env(tmp_path, eval_extra=True), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _printed(lines: list[str], *words: str) -> list[str]:
    """The printed command line holding every one of ``words``, split as a shell would."""
    return shlex.split(next(line.strip() for line in lines if all(word in line.split() for word in words)))


def test_demo_runs_end_to_end_twice_and_its_next_steps_work(assets: TinyAssets, tmp_path: Path) -> None:
    out = tmp_path / "demo"
    folder = out / "hera"
    proc = _run_demo(out, assets, tmp_path, "--steps", "3")
    run_dir = folder / folders.RUN_DIR_NAME
    lines = proc.stdout.splitlines()
    assert len(lines) < 50, proc.stdout  # progress and summary, not LLaMA-Factory's ~700 lines
    assert "Saving model checkpoint" in (folder / folders.LOG_NAME).read_text(encoding="utf-8")  # ... which are here
    assert [line.split("  ")[0] for line in lines if line.startswith("[demo] step")] == [
        "[demo] step 1/3", "[demo] step 2/3", "[demo] step 3/3"]
    assert any(line.startswith("[llamafactory-hera] HeRA: heads [L1H0, L1H2]") for line in lines)
    assert "trainer_log.jsonl" in proc.stdout and "(missing)" not in proc.stdout, proc.stdout
    assert re.search(r"hera_loss\s+[0-9.]+ -> [0-9.]+", proc.stdout), proc.stdout
    plots = sorted(run_dir.glob("*.png"))
    assert {"training_loss.png", "training.png"} <= {p.name for p in plots}
    assert f"Plots ({len(plots)}):" in proc.stdout and all(str(p) in proc.stdout for p in plots)
    assert "stage=sft" in proc.stdout
    assert _printed(lines, "eval", "--baseline")[2:] == [str(run_dir), "--baseline", str(folder / "run_sft"),
                                                         "--tasks", "demo"]
    assert _printed(lines, "eval", "--base")[2:] == [str(run_dir), "--base", "--tasks", "demo"]
    recipe = yaml.safe_load((folder / folders.RECIPE_NAME).read_text(encoding="utf-8"))
    assert recipe["stage"] == "hera" and recipe["max_steps"] == 3 and recipe["output_dir"] == str(run_dir)

    # another demo in the same --output keeps this one's outputs, so its printed next steps still work; it is the
    # suite's run of the RAH-LoRA demo (``python -m llamafactory_hera.demo --method rah``): calibrated, its outputs
    # and next steps printed
    rah = _run_demo(out, assets, tmp_path, "--method", "rah", "--family", "llava")
    assert "RAH-LoRA demo finished" in rah.stdout and "replaced" not in rah.stdout
    assert "--adapter_name_or_path" in rah.stdout and "loosened thresholds" in rah.stdout, rah.stdout
    assert "--do_sample false" in rah.stdout and f"eval {out / 'rah' / 'run'} --base --tasks demo" in rah.stdout
    profile = json.loads((out / "rah" / "run" / "rah_profile.json").read_text(encoding="utf-8"))
    assert profile["summary"]["calibrated"] >= 1 and (out / "rah" / "run" / "adapter_model.safetensors").is_file()
    assert (run_dir / "hera_run.json").is_file() and (run_dir / "adapter_model.safetensors").is_file()
    for step in (_printed(lines, "select", "--report"), _printed(lines, "select", "--output")):
        # the printed program (the venv's console script) and arguments, forked from the warm process: its work, not
        # its imports (what the console script's own process does: tests/test_run_errors.py)
        done = run_python(Path(step[0]), step[1:], cwd=tmp_path, env=offline_env(tmp_path))
        assert done.returncode == 0, done.stderr[-3000:]  # the printed next step works as printed
    assert yaml.safe_load((folder / "recipe_selected.yaml").read_text(encoding="utf-8"))["hera_heads"] != [
        "L1H0", "L1H2"]

    again = _run_demo(out, assets, tmp_path, "--steps", "2", "--quiet")  # the README's command, a second time
    replaced = next(line for line in again.stdout.splitlines() if "replaced the previous" in line)
    assert replaced.startswith(f"[demo] replaced the previous HeRA demo outputs in {folder}: run, recipe.yaml, "
                               "train.log, recipe_selected.yaml"), replaced
    assert replaced.endswith("(the folders of the other demos, rah/, harc/, are left alone)"), replaced
    assert "[demo] step" not in again.stdout
    assert yaml.safe_load((folder / folders.RECIPE_NAME).read_text(encoding="utf-8"))["max_steps"] == 2
    assert not (folder / "recipe_selected.yaml").exists() and (run_dir / "adapter_model.safetensors").is_file()
    assert (out / "rah" / "run" / "adapter_model.safetensors").is_file()  # the RAH-LoRA demo's outputs stay


def test_dev_records_a_ci_runs_timings_outside_the_clone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CI's clone is deleted after the run; its wall time and load go to a log the next developer can read."""
    dev = _dev()
    monkeypatch.setattr(dev, "CI_TIMINGS_LOG", tmp_path / "cache" / "ci-timings.log")
    monkeypatch.setattr(dev, "_timings", [("setup", 100.4), ("pytest", 600.2)])
    dev.record_ci_run("test", 0, 712.3, 0.5)
    dev.record_ci_run("test", 1, 80.0, 1.5)
    first, second = (tmp_path / "cache" / "ci-timings.log").read_text(encoding="utf-8").splitlines()
    assert " test exit=0 total=712s setup=100s pytest=600s load1_start=0.50 " in first, first
    assert " exit=1 total=80s " in second, second
    monkeypatch.delattr("os.getloadavg")  # Windows has none: dev.py still runs and records
    assert math.isnan(dev.load_average())
    dev.record_ci_run("test", 0, 10.0, dev.load_average())
    assert "load1_start=nan load1_end=nan" in (tmp_path / "cache" / "ci-timings.log").read_text().splitlines()[-1]


def test_dev_runs_the_second_stacks_demos_two_at_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The second stack's three demos run on two streams: HARC's beside HeRA's, RAH-LoRA's after HeRA's (its tiny
    models); each line a demo prints comes out after its method's name, each demo's time is a phase, and the exit
    codes come back in the methods' order (the first failure's is the run's). The demos here are a stand-in program
    given as the python, so that dev.py starts real processes."""
    dev = _dev()
    fake = tmp_path / "python"
    fake.write_text(f"#!{sys.executable}\n"
                    "import pathlib, sys, time\n"
                    "method, out = (sys.argv[sys.argv.index(key) + 1] for key in ('--method', '--output'))\n"
                    "start = time.time()\n"
                    "print(f'output of {method} demo', flush=True)\n"
                    "time.sleep(0.5)\n"
                    "(pathlib.Path(out) / method).write_text(f'{start} {time.time()}')\n"
                    "sys.exit(4 if method == 'rah' else 0)\n")
    fake.chmod(0o755)
    assert dev.run_demos(fake, tmp_path, dict(os.environ)) == [0, 4, 0]
    spans = {method: [float(t) for t in (tmp_path / method).read_text().split()] for method in dev.DEMO_METHODS}
    assert spans["harc"][0] < spans["hera"][1] and spans["hera"][0] < spans["harc"][1]  # beside each other
    assert spans["rah"][0] >= spans["hera"][1]  # after the build of the tiny models it reuses
    printed = capsys.readouterr().out
    assert all(f"[{method}] output of {method} demo" in printed for method in dev.DEMO_METHODS)
    assert "demo rah: exit code 4" in printed and printed.count("--steps 3") == 2
    assert [name for name, _ in dev._timings] == ["demo hera", "demo rah", "demo harc"]
