"""Which LLaMA-Factory the plugin was checked on (patches' guard.py): its releases, and its main branch at the commit
pinned in ``tested_main.json`` (main keeps one version number while it moves). A main install at another commit,
or one that records none, is warned of once; the commit is read from the install's ``direct_url.json`` (a git URL's
commit, the HEAD of the clone it was installed from, or the ``COMMIT`` of the source archive or unpacked folder it was
installed from, as dev.py installs main from the shared archive). No model, no run."""

from __future__ import annotations

import io
import json
import re
import subprocess
import tarfile
from pathlib import Path

import pytest

from llamafactory_hera_patches import guard

PINNED = guard.tested_main()


def _git(folder: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(folder), *args], check=True, capture_output=True, text=True).stdout.strip()


def test_the_pinned_main_is_a_full_commit_with_its_date() -> None:
    assert re.fullmatch(r"[0-9a-f]{40}", PINNED["commit"]) and re.fullmatch(r"\d{4}-\d\d-\d\d", PINNED["date"])
    assert PINNED["version"] in guard.CHECKED_VERSIONS


def test_main_at_another_commit_is_said_naming_both_commits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before, every 0.9.6.dev0 passed unseen: main moves under one version number."""
    assert guard.unchecked_note("0.9.5") is None
    assert guard.unchecked_note(PINNED["version"], PINNED["commit"]) is None
    moved = guard.unchecked_note(PINNED["version"], "0123456789" * 4)
    assert moved == (f"llamafactory-hera was checked on LLaMA-Factory 0.9.5 and main at commit {PINNED['commit'][:9]} "
                     f"({PINNED['date']}), found main ({PINNED['version']}) at commit 012345678: main has moved past "
                     "the commit checked (or back), and what changed is not checked; its internals have the expected "
                     "shape, continuing."), moved
    monkeypatch.setattr(guard, "installed_commit", lambda: None)
    assert "at a commit its install does not record" in guard.unchecked_note(PINNED["version"])
    assert ", found 0.9.7; its internals" in guard.unchecked_note("0.9.7")


def test_a_clones_head_is_read_from_its_files(tmp_path: Path) -> None:
    """A branch's ref file, then the same ref packed, then a detached HEAD and a worktree of the clone."""
    clone = tmp_path / "clone"
    clone.mkdir()
    _git(clone, "init", "-q", "-b", "main")
    _git(clone, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "one")
    head = _git(clone, "rev-parse", "HEAD")
    assert guard.git_head(clone) == head
    _git(clone, "pack-refs", "--all")
    assert not (clone / ".git" / "refs" / "heads" / "main").exists() and guard.git_head(clone) == head
    _git(clone, "worktree", "add", "-q", "--detach", str(tmp_path / "tree"))
    assert guard.git_head(tmp_path / "tree") == head
    _git(clone, "checkout", "-q", "--detach")
    assert guard.git_head(clone) == head
    assert guard.git_head(tmp_path) is None


@pytest.mark.parametrize("kind", ["git URL", "clone", "archive", "unpacked archive", "moved archive", "index"])
def test_the_installed_commit_is_read_from_direct_url(kind: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    clone = tmp_path / "my clone"
    clone.mkdir()
    _git(clone, "init", "-q")
    _git(clone, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "one")
    info = tmp_path / "site" / "fakehost-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fakehost\nVersion: 0.1\n", encoding="utf-8")
    unpacked = tmp_path / "LLaMA-Factory-b"
    (unpacked / "src").mkdir(parents=True)
    (unpacked / "COMMIT").write_text("b" * 40 + "\n", encoding="utf-8")
    archive = tmp_path / "main.tar.gz"
    with tarfile.open(archive, "w:gz") as packed:  # as git archive --prefix packs it: COMMIT in the top folder
        for name, text in (("LLaMA-Factory-c/src/COMMIT", "not this one"), ("LLaMA-Factory-c/COMMIT", "c" * 40 + "\n")):
            member = tarfile.TarInfo(name)
            member.size = len(text)
            packed.addfile(member, io.BytesIO(text.encode()))
    direct = {"git URL": {"url": "https://example.org/host.git", "vcs_info": {"vcs": "git", "commit_id": "a" * 40}},
              "clone": {"url": clone.as_uri(), "dir_info": {"editable": True}},
              "archive": {"url": archive.as_uri(), "archive_info": {}},
              "unpacked archive": {"url": unpacked.as_uri(), "dir_info": {}},
              "moved archive": {"url": (tmp_path / "gone.tar.gz").as_uri(), "archive_info": {}}}.get(kind)
    if direct is not None:
        (info / "direct_url.json").write_text(json.dumps(direct), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    expected = {"git URL": "a" * 40, "clone": _git(clone, "rev-parse", "HEAD"), "archive": "c" * 40,
                "unpacked archive": "b" * 40, "moved archive": None, "index": None}[kind]
    assert guard.installed_commit("fakehost") == expected


def test_the_installed_llamafactory_is_a_release_or_the_pinned_main() -> None:
    """On each stack dev.py sets up: 0.9.5 from PyPI records no commit; main (``--stack main``) is installed from
    the shared archive at the pinned commit (its COMMIT), so the guard is silent there."""
    version = guard.host_version()
    if version == PINNED["version"]:
        assert guard.installed_commit() == PINNED["commit"]
    else:
        assert guard.installed_commit() is None
    assert guard.unchecked_note() is None
