"""One teacher pass per dataset: head selection, the monitor's probe pairs and the training run's precompute share
the float32 teacher features by teacher and image (``hera/teacher_cache.py``), in one process (``hera_heads: auto``)
and across two (``select``, then ``llamafactory-cli train``: the store on disk)."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from conftest import base_recipe

FAMILY = "qwen2_5_vl"
# 12 of the 32 images scored by selection, 4 probe pairs for the monitor, every image precomputed for the run
KEYS = {"hera_select_samples": 12, "hera_k": 3, "hera_select_num_heads": 2, "hera_select_batch_size": 4,
        "hera_monitor_pairs": 4, "hera_teacher_precompute": "true", "max_steps": 1}
IMAGES = 32  # distinct images of the hera_demo dataset


def teacher_rows(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Images per teacher forward from now on (every VisionTeacher, whoever calls it)."""
    from llamafactory_hera.hera.teacher import VisionTeacher

    rows: list[int] = []
    forward = VisionTeacher.forward

    def counted(self: Any, pixel_values: torch.Tensor) -> torch.Tensor:
        rows.append(int(pixel_values.shape[0]))
        return forward(self, pixel_values)

    monkeypatch.setattr(VisionTeacher, "forward", counted)
    return rows


def new_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a new process forgets: the in-memory stores (the teachers stay loaded, as a warm cache would)."""
    from llamafactory_hera.hera import teacher_cache as teacher_store

    monkeypatch.setattr(teacher_store, "_STORES", {})


def test_auto_heads_then_training_send_each_image_through_the_teacher_once(assets, tmp_path: Path, monkeypatch,
                                                                         capsys) -> None:
    """``hera_heads: auto`` + monitor + precompute in one ``run_exp``: 32 teacher rows in all (before: 12 for the
    selection, 4 for the monitor's probe pairs, 32 for the precompute = 48). A second run in a new process with the
    selection served from its cache computes only the images neither selection nor the precompute left on disk: the
    probe pairs' images selection did not score (the monitor keeps its rows in memory)."""
    from llamafactory.train.tuner import run_exp

    rows = teacher_rows(monkeypatch)
    recipe = base_recipe(assets, FAMILY, tmp_path / "run", hera_heads="auto", **KEYS)
    run_exp(recipe)
    assert sum(rows) == IMAGES, rows
    computed, shared = (int(n) for n in re.search(r"\((\d+) on this rank, (\d+) from this teacher's earlier pass",
                                                  capsys.readouterr().out).groups())
    assert computed + shared == IMAGES and shared >= 12  # selection's 12, and the probe pairs' images

    new_process(monkeypatch)
    rows.clear()
    run_exp({**recipe, "output_dir": str(tmp_path / "again")})
    out = capsys.readouterr().out
    assert "reusing cached head selection" in out and sum(rows) == shared - 12, rows


def test_select_then_train_in_another_process_share_the_stored_features(assets, tmp_path: Path, monkeypatch,
                                                                       capfd) -> None:
    """``select`` writes its 12 images' features to ``$LLAMAFACTORY_HERA_CACHE/teacher_features``; the training run
    (a new process: nothing in memory) computes the other 20 (before: 32), with the same losses as a run whose
    teacher computes every feature itself."""
    from llamafactory.train.tuner import run_exp

    from llamafactory_hera.cli import main
    from llamafactory_hera.hera.teacher_cache import STORE_NAME

    store = Path(os.environ["LLAMAFACTORY_HERA_CACHE"]) / STORE_NAME
    rows = teacher_rows(monkeypatch)
    recipe = base_recipe(assets, FAMILY, tmp_path / "run", hera_heads=None, **{**KEYS, "hera_monitor_steps": 0})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    assert main(["select", str(path), "--device", "cpu"]) == 0
    assert sum(rows) == 12 and len(list(store.rglob("*.pt"))) == 1
    assert f"teacher features of 12 images kept in {store}" in capfd.readouterr().out

    new_process(monkeypatch)
    rows.clear()
    trained = yaml.safe_load(path.read_text(encoding="utf-8"))  # hera_heads written by select
    run_exp(trained)
    assert sum(rows) == IMAGES - 12, rows

    # the reference: no store at all (another cache folder), every feature computed by the run itself
    new_process(monkeypatch)
    monkeypatch.setenv("LLAMAFACTORY_HERA_CACHE", str(tmp_path / "empty"))
    rows.clear()
    run_exp({**trained, "output_dir": str(tmp_path / "reference")})
    assert sum(rows) == IMAGES
    assert losses(tmp_path / "run") == pytest.approx(losses(tmp_path / "reference"), rel=1e-5)


def losses(run_dir: Path) -> list[float]:
    from conftest import read_trainer_log

    return [line["hera_loss"] for line in read_trainer_log(run_dir) if "hera_loss" in line]


def test_a_changed_image_or_another_teacher_gets_a_fresh_pass(assets, tmp_path: Path, monkeypatch) -> None:
    """Rows are keyed by image content (path, size, mtime) and teacher (files, feature kind, dtype, device type):
    a touched file and the ``mean`` feature go through the teacher again; the stored rows equal the teacher's own,
    read back from disk by a new process. ``trim`` keeps the folder under its bound, oldest files first."""
    from llamafactory_hera.hera import teacher_cache as teacher_store
    from llamafactory_hera.hera.teacher import image_features, load_image_processor, load_teacher

    images = []
    for source in sorted((assets.dataset_dir / "images").glob("*.png"))[:3]:
        images.append(str(shutil.copy(source, tmp_path / source.name)))
    processor = load_image_processor(str(assets.teacher))
    cls = load_teacher(str(assets.teacher), "cls", "cpu")
    rows = teacher_rows(monkeypatch)

    def features(teacher: Any, batch: list[str]) -> torch.Tensor:
        store = teacher_store.feature_store(teacher)
        return teacher_store.stored_image_features(teacher, processor, batch, 8, store, persist=True, workers=0,
                                                   progress=False)

    first = features(cls, images + [images[0]])  # a repeated image is computed once
    assert rows == [3]
    torch.testing.assert_close(first, image_features(cls, processor, images + [images[0]], 8, 0, False))
    new_process(monkeypatch)
    rows.clear()
    again = features(cls, images[::-1])  # from disk, in the order asked
    assert rows == [] and torch.equal(again, first[:3].flip(0))
    stat = os.stat(images[1])
    os.utime(images[1], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    features(cls, images)
    assert rows == [1]
    rows.clear()
    mean = load_teacher(str(assets.teacher), "mean", "cpu")
    assert teacher_store.feature_store(mean) is not teacher_store.feature_store(cls)
    features(mean, images)
    assert rows == [3]
    root = Path(os.environ["LLAMAFACTORY_HERA_CACHE"]) / teacher_store.STORE_NAME
    files = sorted(root.rglob("*.pt"), key=lambda p: p.stat().st_mtime_ns)
    assert len(files) == 3
    assert teacher_store.trim(root, files[-1].stat().st_size, keep={files[-1]}) == 2
    assert list(root.rglob("*.pt")) == [files[-1]]


class FakeRanks:
    """``torch.distributed`` as one rank of two sees it: the other rank's count and rank 0's broadcast given."""

    def __init__(self, rank: int, other_count: int, broadcast: list[Any] | None = None) -> None:
        self.rank, self.other_count, self.broadcast = rank, other_count, broadcast

    def get_rank(self) -> int:
        return self.rank

    def get_world_size(self) -> int:
        return 2

    def all_gather_object(self, out: list[Any], value: Any) -> None:
        out[self.rank], out[1 - self.rank] = value, self.other_count

    def broadcast_object_list(self, payload: list[Any], src: int) -> None:
        if self.rank == src:
            self.broadcast = list(payload)
        else:
            payload[:] = self.broadcast


def test_ranks_with_node_local_image_copies_leave_out_rank_0s_stored_rows_by_position(tmp_path: Path,
                                                                                      monkeypatch) -> None:
    """Keys carry the file's mtime, so a node-local copy of the data gives rank 1 other keys than rank 0: rank 1
    leaves out the positions rank 0's store holds (not the keys it holds), so both gather the same rows; ranks that
    see different numbers of images are refused by name before any gather."""
    from llamafactory_hera.hera import teacher_run
    from llamafactory_hera.hera.teacher_cache import TeacherFeatureStore
    from llamafactory_hera.runtime.errors import RecipeError

    keys0 = [f"path:/data/{i}.png|10|{100 + i}" for i in range(4)]
    keys1 = [f"path:/data/{i}.png|10|{900 + i}" for i in range(4)]  # same files, this node's mtimes
    store = TeacherFeatureStore(tmp_path / "none")
    store.rows = {keys0[1]: torch.ones(3), keys0[3]: torch.zeros(3)}
    monkeypatch.setattr(teacher_run, "distributed", lambda: True)
    rank0 = FakeRanks(0, other_count=4)
    monkeypatch.setattr(torch, "distributed", rank0)
    on0 = teacher_run.stored_rows(store, keys0)
    monkeypatch.setattr(torch, "distributed", FakeRanks(1, other_count=4, broadcast=rank0.broadcast))
    on1 = teacher_run.stored_rows(TeacherFeatureStore(tmp_path / "none"), keys1)
    assert sorted(on0) == sorted(on1) == [1, 3] and torch.equal(on1[1], torch.ones(3))
    monkeypatch.setattr(torch, "distributed", FakeRanks(1, other_count=5))
    with pytest.raises(RecipeError, match=r"rank 0: 5, rank 1: 4.*hera_teacher_precompute: false"):
        teacher_run.stored_rows(store, keys1)


def test_a_failing_store_write_warns_and_selection_goes_on(assets, tmp_path: Path, monkeypatch, capsys) -> None:
    """The store on disk only saves a later pass: a write that fails (here the disk fills halfway through the file)
    prints one warning and selection gets its features; no file stays, under the final name or a temporary one, so
    the next process sends the images through the teacher again; ``trim`` skips files another job removed meanwhile
    and clears ``*.tmp`` files of writes that died over an hour ago (a fresh one may be a live write)."""
    from llamafactory_hera.hera import teacher_cache as teacher_store
    from llamafactory_hera.hera.teacher import load_image_processor, load_teacher

    images = [str(p) for p in sorted((assets.dataset_dir / "images").glob("*.png"))[:2]]
    teacher = load_teacher(str(assets.teacher), "cls", "cpu")
    store = teacher_store.TeacherFeatureStore(tmp_path / "store" / "teacher")

    save = torch.save

    def full_disk(data: Any, file: Any) -> None:  # half the bytes reach the file (a handle, or a path it opens)
        whole = io.BytesIO()
        save(data, whole)
        with contextlib.nullcontext(file) if hasattr(file, "write") else open(file, "wb") as handle:
            handle.write(whole.getvalue()[:whole.tell() // 2])
            handle.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    processor = load_image_processor(str(assets.teacher))
    with monkeypatch.context() as failing:
        failing.setattr(teacher_store.torch, "save", full_disk)
        features = teacher_store.stored_image_features(teacher, processor, images, 8, store, persist=True, workers=0,
                                                       progress=False)
    assert features.shape[0] == 2 and sorted(store.rows) == sorted(store.get(store.rows))
    warning = [line for line in capsys.readouterr().out.splitlines() if "cannot write the cache folder" in line]
    assert len(warning) == 1 and "No space left" in warning[0] and "stay in memory" in warning[0]
    assert [p for p in (tmp_path / "store").rglob("*") if p.is_file()] == []  # no half-written file, by any name
    rows = teacher_rows(monkeypatch)
    teacher_store.stored_image_features(teacher, processor, images, 8,
                                        teacher_store.TeacherFeatureStore(tmp_path / "store" / "teacher"),
                                        persist=False, workers=0, progress=False)
    assert rows == [2]  # the next process finds nothing kept

    root = tmp_path / "trim"
    (root / "t").mkdir(parents=True)
    old, fresh, shard = root / "t" / "old.tmp", root / "t" / "fresh.tmp", root / "t" / "a.pt"
    for file in (old, fresh, shard):
        file.write_bytes(b"x" * 10)
    hour_ago = (os.stat(old).st_mtime_ns - 3601 * 10**9,) * 2
    os.utime(old, ns=hour_ago)
    glob = Path.rglob

    def with_a_removed_file(self: Path, pattern: str) -> Any:
        return [*glob(self, pattern), self / "t" / f"gone{pattern[1:]}"]  # listed, then removed by another job

    monkeypatch.setattr(Path, "rglob", with_a_removed_file)
    assert teacher_store.trim(root, 0) == 1
    monkeypatch.undo()
    assert sorted(p.name for p in root.rglob("*")) == ["fresh.tmp", "t"]
