"""``select``'s result (:class:`SelectionResult`) and its writing: heads into the recipe, the record, the heatmap."""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from ruamel.yaml import YAML, YAMLError
from ruamel.yaml.comments import CommentedMap, CommentedSeq

from llamafactory_hera.heads.geometry import parse_head
from llamafactory_hera.plots.heads import plot_head_heatmap
from llamafactory_hera.runtime.log import show

KEY = "hera_heads"
AUTO_NOTE = "# chosen by `llamafactory-hera select` (was: auto)"
RECORD_VERSION = 1


@dataclass
class SelectionResult:
    """Every head's score and the chosen ones, with all needed to reproduce them."""

    scores: list[list[float]]  # [L][H] MKNN
    selected: list[str]
    strategy: str
    ranking: list[dict[str, Any]]  # every head, least aligned first
    settings: dict[str, Any]
    identity: dict[str, Any]
    versions: dict[str, str]
    num_pairs: int
    duration_s: float
    data_notes: dict[str, Any] = field(default_factory=dict)  # distinct images, duplicates, caption ties
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    record_version: int = RECORD_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


class HeadsExistError(ValueError):
    """The recipe names heads and neither ``--force`` nor ``--output`` was given."""


def _round_trip() -> YAML:
    yaml = YAML()  # round trip: comments, order, quoting, flow style kept
    yaml.preserve_quotes = True
    yaml.width = 4096  # never re-wrap a long line
    return yaml


def _load(text: str, where: Path | str = "the recipe") -> CommentedMap:
    try:
        data = _round_trip().load(text)
    except YAMLError as err:
        raise ValueError(f"{where} is not valid YAML: {err}") from err
    if data is None:
        return CommentedMap()
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a YAML mapping of keys to values, got a {type(data).__name__}")
    return data


def _is_auto(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() == "auto"


def _has_explicit_heads(value: Any) -> bool:
    """True for heads chosen on purpose: a non-empty list, or a scalar other than ``auto`` / empty."""
    if value is None:
        return False
    if isinstance(value, list):
        return bool(value)
    return str(value).strip() != "" and not _is_auto(value)


def set_hera_heads(text: str, heads: list[str]) -> str:
    """``text`` with top-level ``hera_heads`` set to the flow list ``[L13H12, L7H6]``, the rest unchanged; an
    ``auto`` line's comment becomes a note of the heads' origin."""
    chosen = CommentedSeq(str(parse_head(head)) for head in heads)
    chosen.fa.set_flow_style()
    data = _load(text)
    if KEY in data:
        was_auto = _is_auto(data[KEY])
        data[KEY] = chosen
        comment = data.ca.items.get(KEY, [None] * 4)[2]
        if was_auto and comment is not None:
            _, *rest = comment.value.split("\n")
            kept = [line for line in rest if not line.startswith((" ", "\t"))]  # drop the continuation lines
            comment.value = "\n".join([AUTO_NOTE, *kept])
    else:
        keys = list(data)
        data.insert(keys.index("stage") + 1 if "stage" in keys else len(keys), KEY, chosen)
    out = io.StringIO()
    _round_trip().dump(data, out)
    return out.getvalue()


def check_writable(path: Path, *, force: bool = False, output: Path | None = None) -> Path:
    """The file :func:`update_recipe` would write, or its refusal (cheap)."""
    path = Path(path)
    if output is None or Path(output).resolve() == path.resolve():
        mode = stat.S_IMODE(path.stat().st_mode)
        if not mode & stat.S_IWUSR or not os.access(path, os.W_OK):
            raise PermissionError(
                f"{path} is read-only (mode {mode:04o}); it is left as it is. Write the selected heads into a copy "
                "with --output NEW.yaml (or make the recipe writable)."
            )
        current = _load(path.read_text(encoding="utf-8"), path).get(KEY)
        if _has_explicit_heads(current) and not force:
            shown = "[" + ", ".join(map(str, current)) + "]" if isinstance(current, list) else repr(str(current))
            raise HeadsExistError(
                f"{path} already sets hera_heads: {shown}. Pass --force to replace them, "
                "or --output NEW.yaml to write the selected heads into a copy."
            )
        return path
    target = Path(output)
    if target.exists() and not force:
        raise FileExistsError(f"{target} already exists; pass --force to overwrite it, or choose another --output.")
    return target


def update_recipe(path: Path, heads: list[str], *, force: bool = False, output: Path | None = None) -> Path:
    """Write the heads into the recipe, or into ``output``; the written path."""
    path = Path(path)
    target = check_writable(path, force=force, output=output)
    text = path.read_text(encoding="utf-8")
    new_text = set_hera_heads(text, heads)
    expected = {**(yaml.safe_load(text) or {}), KEY: [str(parse_head(head)) for head in heads]}
    if yaml.safe_load(new_text) != expected:  # must read back as the recipe plus the heads
        raise RuntimeError(
            f"internal error: the edited {path} would not read back as before plus the new hera_heads; "
            f"nothing was written. Set hera_heads by hand: hera_heads: [{', '.join(expected[KEY])}]"
        )
    write_text_atomic(target, new_text, mode=stat.S_IMODE(path.stat().st_mode))
    return target


def write_text_atomic(path: Path, text: str, *, mode: int | None = None) -> None:
    """Write via a temporary file and ``os.replace``, following a symlink; a new file gets ``mode``."""
    target = Path(os.path.realpath(path))
    if target.exists():
        mode = stat.S_IMODE(target.stat().st_mode)
    elif mode is None:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def check_folder_writable(folder: Path, what: str) -> None:
    """PermissionError unless a file can be created in ``folder``: a long scoring is never lost at the end."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".hera_write_probe."):
            pass
    except OSError as err:
        raise PermissionError(
            f"cannot write {what} into {folder} ({type(err).__name__}: {err.strerror}); nothing "
            "was scored. Make the folder writable, or pass --output NEW.yaml in a writable "
            "folder."
        ) from None


def write_outputs(result: SelectionResult, json_path: Path, png_path: Path, title: str) -> None:
    """Write record (atomic) and heatmap, saying what is replaced."""
    for path in (json_path, png_path):
        if path.exists():
            show(f"replacing {path}")
    write_text_atomic(json_path, result.to_json() + "\n")
    selected = [(parse_head(h).layer, parse_head(h).head) for h in result.selected]
    plot_head_heatmap(np.asarray(result.scores, dtype=float), selected, png_path, title)
