"""Teacher features kept so an image goes through the teacher once: the run's per-image cache (for later epochs)
and the store shared by head selection, the alignment monitor and a run's precompute (docs/hera-design.md, "One
teacher pass per dataset").
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import Any

import torch

from llamafactory_hera.hera.teacher import VisionTeacher, continuing, image_features, open_image
from llamafactory_hera.runtime.log import line, show


def image_key(image: Any) -> str | None:
    """Content key of an image entry; None for a PIL object."""
    if isinstance(image, dict):
        image = image.get("bytes") or image.get("path")
    if isinstance(image, bytes):
        return "sha1:" + hashlib.sha1(image).hexdigest()
    if isinstance(image, str | os.PathLike):
        path = os.path.abspath(os.fspath(image))
        try:
            stat = os.stat(path)
        except OSError:
            return None  # open_image reports it
        return f"path:{path}|{stat.st_size}|{stat.st_mtime_ns}"
    return None


def image_identity(key: str | None, position: int) -> str:
    return key if key is not None else f"unkeyed:{position}"


def pinned_copies(device: torch.device | str) -> bool:
    """Whether copies to ``device`` use pinned memory: CUDA only (no gain elsewhere)."""
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


def host_buffer(rows: int, width: int, dtype: torch.dtype, pinned: bool) -> torch.Tensor:
    """A pinned block is reused only after its copies ran."""
    return torch.empty(rows, width, dtype=dtype, pin_memory=pinned)


def rows_to_device(rows: list[torch.Tensor], device: torch.device | str) -> torch.Tensor:
    """Host rows ``[E]`` -> ``[len(rows), E]`` on ``device``, through a (pinned for CUDA) staging buffer."""
    staging = host_buffer(len(rows), int(rows[0].shape[-1]), rows[0].dtype, pinned_copies(device))
    torch.stack(rows, out=staging)
    return staging.to(device, non_blocking=True)


def rows_to_host(computed: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """``computed`` copied to the host non-blocking, and the event to wait for (None when synchronous)."""
    host = computed.detach().to("cpu", non_blocking=True)
    if computed.device.type in ("cpu", "meta"):  # meta: the tests' accelerator, synchronous
        return host, None
    event = torch.Event(device=computed.device)
    event.record()
    return host, event


class TeacherFeatureCache:
    """Features ``[E]`` by image key, on the CPU. The lookup takes a computed row only by the :func:`image_identity`
    the collator named it with, so a cache grown since collating (gradient accumulation; workers' older copies) never
    gives one image another's feature."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.features: dict[str, torch.Tensor] = {}
        self._copying: list[tuple[Any, set[str]]] = []  # (event after a copy to host, its keys)

    def _settle(self, keys: set[str]) -> None:
        """Wait for the copies that bring any of ``keys`` (usually long done)."""
        for event, copied in self._copying:
            if copied & keys and not event.query():
                event.synchronize()
        self._copying = [(event, copied) for event, copied in self._copying if not event.query()]

    def __contains__(self, key: str | None) -> bool:
        return self.enabled and key is not None and key in self.features

    def lookup(
        self,
        keys: list[str | None],
        computed: torch.Tensor | None,
        computed_ids: list[str] | None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """``[len(keys), E]`` on ``device`` (default ``computed``'s, else CPU): per key its row of ``computed``
        ``[M, E]`` by ``computed_ids``, else the cached one."""
        computed_ids = list(computed_ids or ())
        num_computed = 0 if computed is None else int(computed.shape[0])
        if num_computed != len(computed_ids):
            raise RuntimeError(
                f"HeRA teacher features: {num_computed} computed rows but {len(computed_ids)} image "
                "identities from the collator; the batch was not built by the HeRA collator."
            )
        if device is None:
            device = computed.device if computed is not None else torch.device("cpu")
        fresh = {identity: row for row, identity in enumerate(computed_ids)}
        sources: list[tuple[str, int]] = []  # ("fresh" | "cached", row)
        cached: list[torch.Tensor] = []
        cached_keys: set[str] = set()
        to_cache: list[tuple[str, int]] = []
        new_keys: set[str] = set()
        for position, key in enumerate(keys):
            identity = image_identity(key, position)
            if identity in fresh:
                sources.append(("fresh", fresh[identity]))
                if self.enabled and key is not None and key not in self.features and key not in new_keys:
                    to_cache.append((key, fresh[identity]))
                    new_keys.add(key)
            elif key in self:
                sources.append(("cached", len(cached)))
                cached.append(self.features[key])
                cached_keys.add(key)
            else:
                raise RuntimeError(
                    f"HeRA teacher features: image {identity} of this batch was neither sent through "
                    "the teacher nor found in the feature cache."
                )
        if to_cache:  # one unwaited copy to host for all new rows
            assert computed is not None
            host, event = rows_to_host(computed)
            self.features.update({key: host[row] for key, row in to_cache})
            if event is not None:  # forget finished copies
                self._copying = [(done, copied) for done, copied in self._copying if not done.query()]
                self._copying.append((event, {key for key, _ in to_cache}))
        if cached and self._copying:
            self._settle(cached_keys)
        block = rows_to_device(cached, device) if cached else None
        fresh_rows = computed.to(device) if computed is not None else None
        if not sources:
            width = computed.shape[-1] if computed is not None else 0
            return torch.zeros(0, width, device=device)
        if fresh_rows is None:
            assert block is not None
            return block  # all cached: already in order
        return torch.stack([fresh_rows[row] if kind == "fresh" else block[row] for kind, row in sources])


CACHE_ENV = "LLAMAFACTORY_HERA_CACHE"
STORE_NAME = "teacher_features"
MAX_STORE_BYTES = 256 * 2**20  # 64k DINOv2-L rows; a selection writes <= hera_select_samples
STALE_TMP_SECONDS = 3600  # a *.tmp this old is a dead write


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "llamafactory_hera"))


_unwritable_said: set[str] = set()  # cache folders already said unwritable


def cache_unwritable(folder: Path, err: OSError | RuntimeError, size: str = "") -> None:
    """Say once per process and cache folder that it cannot be written; results then stay in memory."""
    if str(cache_root()) in _unwritable_said:
        return
    _unwritable_said.add(str(cache_root()))
    why = f"{type(err).__name__}: {getattr(err, 'strerror', None) or err}"
    show(
        line(
            f"warning: cannot write the cache folder {cache_root()} (${CACHE_ENV}; {folder}{size}: {why}); head "
            f"selections and teacher features stay in memory for this command only. Point {CACHE_ENV} at a "
            "writable folder to share them between commands."
        )
    )


def path_fingerprint(path: str | None) -> str | None:
    """Identity of a local folder from its files' names, sizes and mtimes; a hub id as is."""
    if path is None:
        return None
    folder = Path(path).expanduser()  # ~/dinov2 is a folder, as the teacher loader reads it
    if not folder.exists():
        return f"id:{path}"
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = file.stat()
        digest.update(f"{file.relative_to(folder)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def teacher_identity(source: str, feature: str, dtype: torch.dtype, device_type: str) -> str:
    """Name of one teacher's rows (device type included: other kernels round differently)."""
    text = json.dumps([path_fingerprint(source), feature, str(dtype), device_type])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class TeacherFeatureStore:
    """One teacher's float32 ``[E]`` CPU rows by image key, this process's and on disk (read on first use)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.rows: dict[str, torch.Tensor] = {}
        self._read = False
        self.files: dict[str, Path] = {}  # key -> its file
        self.in_use = set[Path]()  # files this pass uses (never trimmed)
        self.said = False  # this pass said where its rows go

    def get(self, keys: Iterable[str | None]) -> dict[str, torch.Tensor]:
        self._read_disk()
        found = {key: self.rows[key] for key in keys if key is not None and key in self.rows}
        self.in_use = {self.files[key] for key in found if key in self.files}
        self.said = False
        return found

    def add(self, rows: dict[str, torch.Tensor], persist: bool) -> None:
        self._read_disk()
        new = {key: row.detach().float().cpu() for key, row in rows.items() if key not in self.rows}
        self.rows.update(new)
        if persist and new:
            self._write(new)

    def _read_disk(self) -> None:
        if self._read:
            return
        self._read = True
        for shard in sorted(self.folder.glob("*.pt")):
            try:
                data = torch.load(shard, map_location="cpu", weights_only=True)
                rows = dict(zip(data["keys"], data["features"], strict=True))
            except Exception as err:  # noqa: BLE001 - costs a teacher pass, not the run
                show(
                    line(
                        f"teacher feature store: {shard} unreadable ({type(err).__name__}); its images go through "
                        "the teacher again."
                    )
                )
                continue
            for key, row in rows.items():
                self.rows.setdefault(key, row.clone())
                self.files.setdefault(key, shard)

    def _write(self, new: dict[str, torch.Tensor]) -> None:
        try:
            removed, size = self._save(new)
        except (OSError, RuntimeError) as err:  # ENOSPC: RuntimeError; costs a later pass
            cache_unwritable(self.folder, err, f", {sum(row.numel() * 4 for row in new.values()):,} bytes to write")
            return
        note = f"; {removed} older file(s) removed to stay under {MAX_STORE_BYTES >> 20} MiB" if removed else ""
        if not self.said or removed:  # once a pass (it writes every KEEP_ROWS), or on removal
            self.said = True
            show(
                line(
                    f"teacher features of {len(new)} images kept in {self.folder} ({size / 2**20:.1f} MiB in "
                    f"{self.folder.parent}{note}; delete that folder to clear it), the pass's others as it goes."
                )
            )

    def _save(self, new: dict[str, torch.Tensor]) -> tuple[int, int]:
        """Write one shard atomically, trim the store; (files removed, bytes held)."""
        shard = self.folder / f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}.pt"
        save_durable({"keys": list(new), "features": torch.stack(list(new.values()))}, shard)
        self.in_use.add(shard)
        self.files.update(dict.fromkeys(new, shard))
        removed = trim(self.folder.parent, MAX_STORE_BYTES, keep=self.in_use)
        return removed, sum(stat.st_size for _, stat in _existing(self.folder.parent, "*.pt"))


def save_durable(data: Any, path: Path) -> None:
    """``torch.save``, ``path`` whole or absent."""
    temporary = path.with_suffix(f".{uuid.uuid4().hex[:8]}.tmp")  # ranks may write one name at once
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(temporary, "wb") as handle:
            torch.save(data, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _existing(root: Path, pattern: str) -> list[tuple[Path, os.stat_result]]:
    found = []
    for path in root.rglob(pattern):
        try:
            found.append((path, path.stat()))
        except FileNotFoundError:
            continue
    return found


def trim(root: Path, limit: int, keep: Collection[Path] = ()) -> int:
    """Remove the oldest ``*.pt`` not in ``keep`` down to ``limit`` bytes, and stale ``*.tmp``; how many ``*.pt``
    went."""
    stale = time.time_ns() - STALE_TMP_SECONDS * 10**9
    for leftover, stat in _existing(root, "*.tmp"):
        if stat.st_mtime_ns < stale:
            leftover.unlink(missing_ok=True)
    files = sorted(_existing(root, "*.pt"), key=lambda item: item[1].st_mtime_ns)
    total = sum(stat.st_size for _, stat in files)
    removed = 0
    for file, stat in files:
        if total <= limit:
            break
        if file in keep:
            continue
        total -= stat.st_size
        file.unlink(missing_ok=True)
        removed += 1
    return removed


_STORES: dict[str, TeacherFeatureStore] = {}


def feature_store(teacher: VisionTeacher) -> TeacherFeatureStore | None:
    """The store of ``teacher`` as it runs now; None for one not from :func:`teacher.load_teacher`."""
    source = getattr(teacher, "source", None)
    if source is None:
        return None
    param = next(teacher.parameters())
    folder = cache_root() / STORE_NAME / teacher_identity(source, teacher.feature, param.dtype, param.device.type)
    return _STORES.setdefault(str(folder), TeacherFeatureStore(folder))


def stored_image_features(
    teacher: VisionTeacher,
    image_processor: Any,
    images: list[Any],
    batch_size: int,
    store: TeacherFeatureStore,
    *,
    persist: bool,
    workers: int | None = None,
    progress: bool = True,
    desc: str = "teacher features",
    opener: Callable[[Any], Any] = open_image,
) -> torch.Tensor:
    """As :func:`image_features`, taking ``store``'s rows; other distinct images go through the teacher once and are
    stored (on disk with ``persist``); unkeyed (PIL) images always do."""
    keys = [image_key(image) for image in images]
    found = store.get(keys)
    todo: dict[str | int, int] = {}  # key (unkeyed: position) -> output row
    todo_images = []
    for position, (image, key) in enumerate(zip(images, keys, strict=True)):
        name: str | int = position if key is None else key
        if name not in found and name not in todo:
            todo[name] = len(todo_images)
            todo_images.append(image)
    device = next(teacher.parameters()).device
    if found and not todo_images:
        return rows_to_device([found[key] for key in keys if key is not None], device)  # all found: none unkeyed
    continuing(len(found), len(found) + len(todo), desc)

    def keep(first: int, rows: torch.Tensor) -> None:  # todo names in row order
        pairs = zip(list(todo)[first : first + len(rows)], rows.cpu(), strict=True)
        store.add({name: row for name, row in pairs if isinstance(name, str)}, persist)

    computed = image_features(teacher, image_processor, todo_images, batch_size, workers, progress, desc, opener, keep)
    if not found:  # all computed; repeated images share a row
        return (
            computed
            if len(todo_images) == len(images)
            else computed[torch.tensor([todo[_name(key, i)] for i, key in enumerate(keys)])]
        )
    stored_keys = list(found)
    stored = rows_to_device([found[key] for key in stored_keys], device)
    where = {key: row for row, key in enumerate(stored_keys)}
    return torch.stack(
        [stored[where[key]] if key in where else computed[todo[_name(key, i)]] for i, key in enumerate(keys)]
    )


def _name(key: str | None, position: int) -> str | int:
    return position if key is None else key
