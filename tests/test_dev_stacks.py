"""dev.py's stacks: each in its own venv; ``--stack all`` (CI) runs pinned, oldest and main. LLaMA-Factory main comes
from ``LLAMAFACTORY_MAIN_SOURCE`` (a source archive with its ``COMMIT``, that archive unpacked, a git URL or a clone),
by default from the newest archive in the shared folder beside the repository, and is checked before any stack is
built: a missing or wrong source is one line naming the variable, its value and the fix. ``pin-main`` moves the pin
the version guard names. dev.py is loaded as a module; nothing is installed, no network (git sources are local)."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO

PIN = json.loads((REPO / "patches" / "llamafactory_hera_patches" / "tested_main.json").read_text(encoding="utf-8"))
COMMIT_TIME = 1_787_053_740  # 2026-08-18 11:49 UTC: git archive stamps each file with its commit's time


def _dev() -> Any:
    spec = importlib.util.spec_from_file_location("hera_dev", REPO / "dev.py")
    dev = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dev)
    return dev


def _source(folder: Path, commit: str | None = PIN["commit"], version: str = "0.9.6.dev0") -> Path:
    """A stand-in of LLaMA-Factory's source as the shared archive holds it (``COMMIT`` left out where None)."""
    (folder / "src" / "llamafactory" / "extras").mkdir(parents=True)
    (folder / "pyproject.toml").write_text("[project]\nname = 'llamafactory'\n", encoding="utf-8")
    (folder / "src" / "llamafactory" / "extras" / "env.py").write_text(f'VERSION = "{version}"\n', encoding="utf-8")
    if commit is not None:
        (folder / "COMMIT").write_text(commit + "\n", encoding="utf-8")
    return folder


def _archive(path: Path, committed: int = COMMIT_TIME, **source: Any) -> Path:
    """``_source`` packed as ``git archive --prefix=LLaMA-Factory-<commit>/`` packs it, each file at the commit's
    time."""
    with tarfile.open(path, "w:gz") as archive:
        for file in sorted(_source(path.parent / f"{path.name}.d", **source).rglob("*")):
            if file.is_file():
                info = tarfile.TarInfo(f"LLaMA-Factory-x/{file.relative_to(path.parent / f'{path.name}.d')}")
                data = file.read_bytes()
                info.size = len(data)
                info.mtime = committed
                archive.addfile(info, io.BytesIO(data))
    return path


def _clone(folder: Path) -> str:
    """A git clone with one commit; its commit."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(folder), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              check=True, capture_output=True, text=True).stdout.strip()

    _source(folder, commit=None)
    git("init", "-q", "-b", "main")
    git("add", "-A")
    git("commit", "-q", "-m", "one")
    return git("rev-parse", "HEAD")


@pytest.fixture
def dev(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """dev.py with an empty shared folder and ``LLAMAFACTORY_MAIN_SOURCE`` unset."""
    module = _dev()
    monkeypatch.setattr(module, "SHARED_MAIN", tmp_path / "shared" / "llamafactory-main")
    module.SHARED_MAIN.mkdir(parents=True)
    monkeypatch.delenv(module.MAIN_SOURCE_ENV, raising=False)
    return module


def test_main_comes_from_the_pinned_shared_archive_else_the_newest_by_default(dev: Any) -> None:
    """The archive at the pin, whatever else lies beside it (a newer main keeps CI on the pin until pin-main moves
    it); without one, the newest by its commit's time (its files'), whatever the archives' names and their own
    times (a copy's), which is then refused for its commit, with the fix."""
    pinned = _archive(dev.SHARED_MAIN / "llamafactory-main-0000.tar.gz")
    older = _archive(dev.SHARED_MAIN / "llamafactory-main-aaaaaaaaa.tar.gz", COMMIT_TIME - 86_400, commit="a" * 40)
    os.utime(pinned, (COMMIT_TIME, COMMIT_TIME))
    assert older.stat().st_mtime > pinned.stat().st_mtime
    assert dev.main_source() == ("archive", str(pinned))
    assert dev.main_requirement() == f"llamafactory @ {pinned.as_uri()}"
    broken = dev.SHARED_MAIN / "llamafactory-main-broken.tar.gz"
    broken.write_text("cut short", encoding="utf-8")  # unreadable: taken by its own time, the newest
    assert dev.main_source() == ("archive", str(pinned))
    pinned.unlink()
    with pytest.raises(SystemExit):
        dev.main_source()


def test_main_comes_from_an_archive_a_folder_a_clone_or_a_git_url(dev: Any, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """An archive or its unpacked folder is installed as it is (its COMMIT is the pin's, which the version guard
    reads); a git source at the pinned commit, whichever its HEAD is."""
    archive = _archive(tmp_path / "main.tar.gz")
    folder = _source(tmp_path / "unpacked")
    clone = tmp_path / "LLaMA-Factory"
    _clone(clone)
    for given, expected in ((archive, ("archive", str(archive))), (folder, ("folder", str(folder))),
                            (clone, ("git", clone.as_uri())), (clone.as_uri(), ("git", clone.as_uri()))):
        monkeypatch.setenv(dev.MAIN_SOURCE_ENV, str(given))
        assert dev.main_source() == expected, given
    assert dev.main_requirement() == f"llamafactory @ git+{clone.as_uri()}@{PIN['commit']}"
    monkeypatch.setenv(dev.MAIN_SOURCE_ENV, str(folder))
    assert dev.main_requirement() == f"llamafactory @ {folder.as_uri()}"


def _refusals(tmp_path: Path) -> list[tuple[str, str]]:
    """(a wrong source, why it is refused): each a case a user can give."""
    plain = tmp_path / "notes.txt"
    plain.write_text("not an archive\n", encoding="utf-8")
    return [
        (str(tmp_path / "nowhere.tar.gz"), "no such file or folder"),
        (str(plain), "not a folder, and not a tar archive a source of main comes as"),
        (str(_archive(tmp_path / "no-commit.tar.gz", commit=None)),
         "no COMMIT in it: not LLaMA-Factory's source as an archive of main holds it"),
        (str(_source(tmp_path / "other-project") / "src"),
         "no src/llamafactory/extras/env.py nor COMMIT in it: not LLaMA-Factory's source as an archive of main holds "
         "it"),
        (str(_archive(tmp_path / "short.tar.gz", commit="ff6d4d12e")),
         "its COMMIT holds 'ff6d4d12e', not a whole commit id"),
        (str(_archive(tmp_path / "moved.tar.gz", commit="b" * 40)),
         f"it holds main at {'b' * 40}, tested_main.json pins {PIN['commit']}: pin it with python3 dev.py pin-main, "
         "or name a source at the pin"),
        ((tmp_path / "no-clone").as_uri(), "not reachable, git ls-remote: fatal: "),
    ]


def test_a_wrong_main_source_is_one_line_before_anything_is_built(dev: Any, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Each refused in the seconds its check takes, before the pinned stack's venv: before, a wrong source was found
    after the venv was built, and an unset one left main out of CI."""
    built: list[str] = []
    monkeypatch.setattr(dev, "setup", lambda command, stack, host=None: built.append(stack) or Path(sys.executable))
    fix = ("set LLAMAFACTORY_MAIN_SOURCE to a source archive of LLaMA-Factory main with its COMMIT file (as in "
           "../shared/llamafactory-main/), that archive unpacked, or a git URL or clone of LLaMA-Factory")
    cases = [("", f"not set, and {dev.SHARED_MAIN} holds no *.tar.gz"), *_refusals(tmp_path)]
    for given, why in cases:
        monkeypatch.setenv(dev.MAIN_SOURCE_ENV, given)
        for stack in ("main", "all"):
            assert dev.main(["test", "--stack", stack]) == 2, given
            printed = capsys.readouterr().out.splitlines()
            assert len(printed) == 1, printed
            assert printed[0].startswith(f"[dev.py] cannot set up LLaMA-Factory main: LLAMAFACTORY_MAIN_SOURCE="
                                         f"{given} ({why}"), (printed, why)
            assert printed[0].endswith(f"); {fix}"), printed
    assert built == []


def test_all_runs_pinned_oldest_and_main_each_in_its_own_venv(dev: Any, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """``--stack`` picks a stack's venv and constraints file; ``all`` (CI) runs the pinned stack's suite, then the
    second stack's demos and subset, then main's, LLaMA-Factory main from the shared archive; the first failure's
    exit code is the run's."""
    assert dev.stack_option("test", ["-x"]) == ("pinned", ["-x"])
    assert dev.stack_option("test", ["-x", "--stack", "oldest", "-k", "a"]) == ("oldest", ["-x", "-k", "a"])
    assert dev.stack_option("test", ["--stack", "all"]) == ("all", [])
    assert dev.stack_option("demo", ["--stack", "all"])[0] is None and dev.stack_option("test", ["--stack"])[0] is None
    for name, (venv_name, constraints) in dev.STACKS.items():
        dev.use_stack(name)
        assert dev.VENV == REPO / venv_name and dev.CONSTRAINTS == REPO / constraints and dev.CONSTRAINTS.is_file()
        assert f"/{venv_name}/" in (REPO / ".gitignore").read_text() or venv_name == ".venv"
    assert all((REPO / path.split("::")[0]).is_file() for path in (*dev.OLDEST_STACK_TESTS, *dev.MAIN_STACK_TESTS))
    archive = _archive(dev.SHARED_MAIN / "llamafactory-main-ff6d4d12e.tar.gz")
    ran: list[tuple[str, str, str | None]] = []
    monkeypatch.setattr(dev, "setup", lambda command, stack, host=None: ran.append(("setup", stack, host))
                        or Path(sys.executable))
    monkeypatch.setattr(dev, "cmd_test", lambda python, args: ran.append(("suite", "pinned", None)) or 0)
    monkeypatch.setattr(dev, "cmd_test_second_stack",
                        lambda python, args, stack: ran.append(("subset", stack, None)) or 3 * (stack == "oldest"))
    assert dev.main(["test", "--stack", "all"]) == 3
    host = f"llamafactory @ {archive.as_uri()}"
    assert ran == [("setup", "pinned", None), ("suite", "pinned", None), ("setup", "oldest", None),
                   ("subset", "oldest", None), ("setup", "main", host), ("subset", "main", None)]
    ran.clear()
    assert dev.main(["test", "--stack", "oldest"]) == 3 and ("setup", "main", host) not in ran
    archive.unlink()  # the other stacks need no source of main
    assert dev.main(["test"]) == 0


def test_pin_main_takes_an_archive_a_folder_or_a_ref_of_a_git_source(dev: Any, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """``dev.py pin-main [REF]`` writes the commit, its date and LLaMA-Factory's version into the pin that
    ``--stack main`` installs and the version guard names: an archive's or folder's COMMIT (dated by its files,
    which git archive stamps with the commit's time), or REF of a git source (default: its HEAD)."""
    monkeypatch.setattr(dev, "TESTED_MAIN", tmp_path / "tested_main.json")
    newer = _archive(tmp_path / "newer.tar.gz", commit="c" * 40, version="0.9.6.dev1")
    monkeypatch.setenv(dev.MAIN_SOURCE_ENV, str(newer))
    assert dev.main(["pin-main"]) == 0
    assert json.loads(dev.TESTED_MAIN.read_text()) == {"version": "0.9.6.dev1", "commit": "c" * 40,
                                                       "date": "2026-08-18"}
    assert dev.main_source() == ("archive", str(newer))  # now the pin's
    assert dev.main(["pin-main", "main"]) == 2  # an archive holds one commit
    clone = tmp_path / "LLaMA-Factory"
    head = _clone(clone)
    monkeypatch.setenv(dev.MAIN_SOURCE_ENV, str(clone))
    assert dev.main(["pin-main"]) == 0
    pin = json.loads(dev.TESTED_MAIN.read_text())
    assert pin["commit"] == head and pin["version"] == "0.9.6.dev0"
    assert dev.main_requirement() == f"llamafactory @ git+{clone.as_uri()}@{head}"
    assert dev.main(["pin-main", "no-such-branch"]) == 1


def test_main_leaves_out_only_tests_another_stack_runs(dev: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """What main's part of CI leaves out to fit the 25 minutes is in the oldest stack's subset, and run there."""
    ran: list[list[str]] = []
    monkeypatch.setattr(dev, "run_demos", lambda python, output, env: [0, 0, 0])
    monkeypatch.setattr(dev, "run", lambda cmd, env=None, check=True: ran.append([str(part) for part in cmd]) or 0)
    for stack in ("oldest", "main"):
        assert dev.cmd_test_second_stack(Path(sys.executable), [], stack) == 0
    oldest, main = ran
    assert dev.MAIN_STACK_LEFT_OUT
    for test in dev.MAIN_STACK_LEFT_OUT:
        assert test.split("::")[0] in dev.OLDEST_STACK_TESTS and test not in oldest, test
        assert main[main.index(test) - 1] == "--deselect", main
