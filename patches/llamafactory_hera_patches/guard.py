"""Shape checks of the host before patching, and which LLaMA-Factory the plugin was checked on: releases
(``CHECKED_VERSIONS``) and, for main (one version number while it moves), the commit pinned in ``tested_main.json``
(``dev.py test --stack main`` installs it, ``dev.py pin-main`` moves it). A main install at another commit (its
``direct_url.json``, PEP 610: a git URL's commit, a clone's HEAD, a source archive's ``COMMIT``) is warned about once.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import ModuleType
from urllib.parse import unquote, urlparse

from . import CHECKED_VERSIONS

TESTED_MAIN = Path(__file__).with_name("tested_main.json")  # {"version", "commit", "date"}

DISABLE_ENV = "LLAMAFACTORY_HERA_DISABLE"


class HostMismatchError(RuntimeError):
    """The host's internals lack the shape a patch was written for."""


def host_version(distribution: str = "llamafactory") -> str:
    from importlib.metadata import PackageNotFoundError, version  # lazy: patches load at every start-up

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "unknown"


def recorded_versions() -> dict[str, str]:
    """The versions a run's record names (select's and RAH-LoRA's)."""
    return {name: host_version(name) for name in ("llamafactory-hera", "llamafactory", "transformers", "torch", "peft")}


def tested_main() -> dict[str, str]:
    return json.loads(TESTED_MAIN.read_text(encoding="utf-8"))


def checked_hosts() -> str:
    main = tested_main()
    releases = [version for version in CHECKED_VERSIONS if version != main["version"]]
    return f"{', '.join(releases)} and main at commit {main['commit'][:9]} ({main['date']})"


def git_head(folder: Path) -> str | None:
    """A clone's ``HEAD`` commit, read from its files (worktree ``.git`` files, ref files, ``packed-refs``); None if
    ``folder`` is no clone."""
    git = folder / ".git"
    try:
        if git.is_file():  # a worktree or submodule: "gitdir: <path>"
            git = (folder / git.read_text(encoding="utf-8").split(":", 1)[1].strip()).resolve()
        head = (git / "HEAD").read_text(encoding="utf-8").strip()
        if not head.startswith("ref: "):
            return head
        ref = head.removeprefix("ref: ")
        common = git / "commondir"
        base = (git / common.read_text(encoding="utf-8").strip()).resolve() if common.is_file() else git
        if (base / ref).is_file():
            return (base / ref).read_text(encoding="utf-8").strip()
        packed = (base / "packed-refs").read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    return next((line.split()[0] for line in packed if line.endswith(f" {ref}")), None)


def source_commit(source: Path) -> str | None:
    """The commit of a local source of main: a source archive's ``COMMIT`` file or a clone's HEAD; None where it names
    none."""
    import tarfile  # lazy: patches load at every start-up

    if source.is_dir():
        named = source / "COMMIT"
        return named.read_text(encoding="utf-8").strip() if named.is_file() else git_head(source)
    try:
        with tarfile.open(source) as archive:  # the archive's files lie in one top folder
            member = next((m for m in archive if m.isfile() and Path(m.name).parts[1:] == ("COMMIT",)), None)
            return archive.extractfile(member).read().decode().strip() if member else None
    except (tarfile.TarError, OSError):  # moved or removed since the install
        return None


def installed_commit(distribution: str = "llamafactory") -> str | None:
    """The commit ``distribution`` was built from (``direct_url.json``); None for an index release or unknown."""
    # lazy: patches load at every start-up
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import distribution as installed

    try:
        text = installed(distribution).read_text("direct_url.json")
    except PackageNotFoundError:
        return None
    direct = json.loads(text) if text else {}
    commit = direct.get("vcs_info", {}).get("commit_id")
    url = urlparse(str(direct.get("url", "")))
    if commit is None and url.scheme == "file":
        return source_commit(Path(unquote(url.path)))
    return commit


def unchecked_note(version: str | None = None, commit: str | None = None) -> str | None:
    """The warning for a host (installed by default) that is neither a checked release nor main at the checked
    commit; else None."""
    version = host_version() if version is None else version
    main = tested_main()
    if version not in CHECKED_VERSIONS:
        found = version
    elif version != main["version"]:
        return None
    else:
        commit = installed_commit() if commit is None else commit
        if commit == main["commit"]:
            return None
        found = (
            f"main ({version}) at commit {commit[:9]}: main has moved past the commit checked (or back), and what "
            "changed is not checked"
            if commit
            else f"main ({version}) at a commit its install does not record (installed neither from a git URL nor "
            "from a clone or a source archive with its COMMIT), so which main is not known"
        )
    return (
        f"llamafactory-hera was checked on LLaMA-Factory {checked_hosts()}, found {found}; its internals have the "
        "expected shape, continuing."
    )


def mismatch(patch: str, found: str) -> HostMismatchError:
    return HostMismatchError(
        f"llamafactory-hera: LLaMA-Factory {host_version()} does not have the internals the '{patch}' patch "
        f"was written for ({found}). The plugin was checked on LLaMA-Factory {checked_hosts()}; install one of "
        f"those, upgrade llamafactory-hera, or set {DISABLE_ENV}=1 to run LLaMA-Factory without the plugin."
    )


def require(module: ModuleType, names: tuple[str, ...], patch: str) -> None:
    missing = [name for name in names if not hasattr(module, name)]
    if missing:
        raise mismatch(patch, f"{module.__name__} lacks {', '.join(missing)}")


_warned = False


def warn_if_unchecked() -> None:
    """Warn once about an unchecked host (:func:`unchecked_note`; shapes already verified)."""
    global _warned
    note = None if _warned else unchecked_note()
    if note:
        _warned = True
        warnings.warn(note, stacklevel=2)
