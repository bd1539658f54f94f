"""The teacher feature store serves each image the features of the teacher that asks, as that teacher computes them:
replaced weights at the same path, another dtype and an in-memory image in the batch never lead to another teacher's
or another image's row, and every write keeps the store under its size cap. Each served row is checked against a
brute-force pass: the teacher on one image at a time, read with PIL, no store."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from test_hera_teacher_store import new_process, teacher_rows

from llamafactory_hera.hera import teacher as teacher_module
from llamafactory_hera.hera import teacher_cache as teacher_store
from llamafactory_hera.hera.teacher import load_image_processor, load_teacher
from llamafactory_hera_testing.teachers import build_vision_teacher


def copied_images(assets: Any, folder: Path, count: int) -> list[str]:
    """``count`` fixture images copied to ``folder`` (the store keys them by path, size and mtime)."""
    folder.mkdir(parents=True, exist_ok=True)
    return [str(shutil.copy(source, folder / source.name))
            for source in sorted((assets.dataset_dir / "images").glob("*.png"))[:count]]


def served(teacher: Any, processor: Any, images: list[Any]) -> torch.Tensor:
    """The features selection gets (``select``, ``hera_heads: auto``): through the teacher's store, kept on disk."""
    return teacher_store.stored_image_features(teacher, processor, images, 8, teacher_store.feature_store(teacher),
                                               persist=True, workers=0, progress=False)


def brute_force(teacher: Any, processor: Any, paths: list[str]) -> torch.Tensor:
    """The teacher's own features of ``paths``: one image per forward, no store, no cache."""
    with torch.no_grad():
        return torch.cat([teacher(processor([Image.open(path).convert("RGB")], return_tensors="pt")["pixel_values"])
                          for path in paths])


def forget_teachers(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new process: no store in memory and no teacher loaded (so replaced weights are read)."""
    new_process(monkeypatch)
    monkeypatch.setattr(teacher_module, "_TEACHERS", {})


def test_replaced_teacher_weights_at_the_same_path_are_not_served_the_old_features(assets, tmp_path: Path,
                                                                                  monkeypatch) -> None:
    """``select`` with one teacher, then new weights saved to the same folder: the next run's features (HeRA's
    targets) are the new teacher's, not the rows the old one left in the store."""
    folder = build_vision_teacher("dinov2", tmp_path / "teacher", seed=0)
    images = copied_images(assets, tmp_path / "images", 3)
    processor = load_image_processor(str(folder))
    old = served(load_teacher(str(folder), "cls", "cpu"), processor, images)

    forget_teachers(monkeypatch)
    build_vision_teacher("dinov2", folder, seed=1)  # the same path, other weights
    teacher = load_teacher(str(folder), "cls", "cpu")
    reference = brute_force(teacher, processor, images)
    assert not torch.allclose(old, reference)  # the new weights do change the features
    rows = teacher_rows(monkeypatch)
    torch.testing.assert_close(served(teacher, processor, images), reference)
    assert rows == [3]


def test_bf16_and_fp32_teachers_do_not_share_stored_rows(assets, tmp_path: Path, monkeypatch) -> None:
    """The same teacher in bfloat16, then in float32 (in one process and in the next): each gets its own dtype's
    features, never the other's rounding."""
    images = copied_images(assets, tmp_path / "images", 3)
    processor = load_image_processor(str(assets.teacher))
    bf16 = load_teacher(str(assets.teacher), "cls", "cpu", dtype=torch.bfloat16)
    fp32 = load_teacher(str(assets.teacher), "cls", "cpu")
    bf16_reference, fp32_reference = brute_force(bf16, processor, images), brute_force(fp32, processor, images)
    assert not torch.allclose(bf16_reference, fp32_reference)  # bfloat16 rounds the tiny teacher's features

    torch.testing.assert_close(served(bf16, processor, images), bf16_reference)
    torch.testing.assert_close(served(fp32, processor, images), fp32_reference)
    new_process(monkeypatch)
    rows = teacher_rows(monkeypatch)
    torch.testing.assert_close(served(fp32, processor, images[::-1]), fp32_reference.flip(0))
    torch.testing.assert_close(served(bf16, processor, images), bf16_reference)
    assert rows == []  # both read back from their own rows on disk


def test_every_write_keeps_the_store_under_its_size_cap(assets, tmp_path: Path, monkeypatch, capsys) -> None:
    """Writes of two teachers (``cls`` and ``mean``), one image each, under a cap of two and a half writes: after
    every write the whole store is at most the cap, the oldest write goes first (its image goes through the teacher
    again) and the run says so."""
    images = copied_images(assets, tmp_path / "images", 4)
    processor = load_image_processor(str(assets.teacher))
    cls, mean = load_teacher(str(assets.teacher), "cls", "cpu"), load_teacher(str(assets.teacher), "mean", "cpu")
    root = Path(os.environ["LLAMAFACTORY_HERA_CACHE"]) / teacher_store.STORE_NAME

    def store_bytes() -> int:
        return sum(path.stat().st_size for path in root.rglob("*.pt"))

    served(cls, processor, images[:1])
    cap = store_bytes() * 5 // 2
    monkeypatch.setattr(teacher_store, "MAX_STORE_BYTES", cap)
    for teacher, image in [(mean, images[1]), (cls, images[2]), (mean, images[3])]:
        time.sleep(0.05)  # distinct mtimes: the age order trim goes by
        served(teacher, processor, [image])
        assert store_bytes() <= cap
    assert len(list(root.rglob("*.pt"))) == 2
    assert capsys.readouterr().out.count("1 older file(s) removed to stay under") == 2

    cls_reference = brute_force(cls, processor, images[:3:2])
    mean_reference = brute_force(mean, processor, images[1::2])
    new_process(monkeypatch)
    rows = teacher_rows(monkeypatch)
    torch.testing.assert_close(served(cls, processor, images[:3:2]), cls_reference)
    torch.testing.assert_close(served(mean, processor, images[1::2]), mean_reference)
    # the first image of each teacher: removed; cls's pass keeps the file it reads, so mean's newest write goes
    assert rows == [1, 2]


def test_an_in_memory_image_first_in_a_batch_leaves_the_right_rows_for_the_others(assets, tmp_path: Path,
                                                                                 monkeypatch) -> None:
    """A batch whose first image is an in-memory PIL image (no key, never stored), then two files: each file's stored
    row is that file's feature, as a new process reads it back."""
    images = copied_images(assets, tmp_path / "images", 3)
    processor = load_image_processor(str(assets.teacher))
    teacher = load_teacher(str(assets.teacher), "cls", "cpu")
    reference = brute_force(teacher, processor, images)
    in_memory = Image.open(images[2]).convert("RGB")

    torch.testing.assert_close(served(teacher, processor, [in_memory, images[0], images[1]]), reference[[2, 0, 1]])
    new_process(monkeypatch)
    rows = teacher_rows(monkeypatch)
    torch.testing.assert_close(served(teacher, processor, images[:2]), reference[:2])
    assert rows == []
