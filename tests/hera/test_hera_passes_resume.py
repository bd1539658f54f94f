"""A pass before step 1 killed midway keeps what it finished: the teacher's rows (the feature store, written every
``KEEP_ROWS`` rows) and selection's per-batch pooled head inputs; the rerun computes only the rest and equals an
uninterrupted pass bit for bit (the same batches in the same order). A kill is an exception raised from the teacher's
forward or after a batch; a truncated file is never read: its rows are computed again."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from test_hera_teacher_store import new_process, teacher_rows
from test_hera_teacher_store_rows import copied_images

from conftest import base_recipe
from llamafactory_hera.hera import teacher as teacher_module
from llamafactory_hera.hera import teacher_cache
from llamafactory_hera.hera.selection import collect
from llamafactory_hera.hera.selection.select import SelectionOptions, prepare, score_head_neighbours
from llamafactory_hera.hera.teacher import VisionTeacher, image_features, load_image_processor, load_teacher, open_image
from llamafactory_hera.hera.teacher_run import precompute_teacher_features


class Killed(Exception):
    """The simulated kill."""


def kill_after(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, calls: int | None, before: bool = False
               ) -> list[int]:
    """``owner.name`` counted (the list returned); it raises :class:`Killed` at call ``calls + 1`` (``before``: instead
    of running) or after call ``calls``."""
    original, done = getattr(owner, name), []

    def wrapped(*args: Any) -> Any:
        if before and len(done) == calls:
            raise Killed
        result = original(*args)
        done.append(1)
        if not before and len(done) == calls:
            raise Killed
        return result

    monkeypatch.setattr(owner, name, wrapped)
    return done


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_a_killed_precompute_reruns_only_the_rows_it_had_not_kept(assets, tmp_path: Path, monkeypatch,
                                                                  capsys) -> None:
    """12 images in batches of 2, rows kept every 4: killed at the 6th forward (10 rows computed, 8 kept in two
    files), the rerun computes 4 rows; with one of the two files truncated, 8. Both equal the uninterrupted pass."""
    monkeypatch.setattr(teacher_module, "KEEP_ROWS", 4)
    by_key = {teacher_cache.image_key(path): path for path in copied_images(assets, tmp_path / "images", 12)}
    teacher, processor = load_teacher(str(assets.teacher), "cls", "cpu"), load_image_processor(str(assets.teacher))

    def precompute(store: Any) -> torch.Tensor:
        cache = teacher_cache.TeacherFeatureCache()
        precompute_teacher_features(teacher, processor, by_key, cache, 2, open_image, True, store)
        return torch.stack([cache.features[key] for key in sorted(by_key)])

    uninterrupted = precompute(None)
    with monkeypatch.context() as killing:
        kill_after(killing, VisionTeacher, "forward", 5, before=True)
        with pytest.raises(Killed):
            precompute(teacher_cache.feature_store(teacher))
    folder = teacher_cache.feature_store(teacher).folder
    assert len(list(folder.glob("*.pt"))) == 2 and not list(folder.glob("*.tmp"))
    shutil.copytree(folder, tmp_path / "killed")
    for files_left, computed in ((2, [2, 2]), (1, [2, 2, 2, 2])):
        if files_left == 1:  # the killed pass's files again, one of them half-written
            shutil.rmtree(folder)
            shutil.copytree(tmp_path / "killed", folder)
            truncate(sorted(folder.glob("*.pt"))[1])
        new_process(monkeypatch)
        rows = teacher_rows(monkeypatch)
        capsys.readouterr()
        assert torch.equal(precompute(teacher_cache.feature_store(teacher)), uninterrupted)
        assert rows == computed
        assert f"continuing from {12 - sum(computed)} of 12 rows" in capsys.readouterr().out


def test_a_killed_selection_teacher_pass_keeps_its_rows(assets, tmp_path: Path, monkeypatch, capsys) -> None:
    """Selection's teacher pass (through the store) over 12 images, 3 of them listed twice: killed after its first
    batch of 8, the rerun sends the other 4 distinct images through the teacher (continuing from 8 of 12 rows: a
    repeated image is one row), and the rows equal one uninterrupted pass."""
    monkeypatch.setattr(teacher_module, "KEEP_ROWS", 4)
    distinct = copied_images(assets, tmp_path / "images", 12)
    images = [*distinct, *distinct[:3]]
    teacher, processor = load_teacher(str(assets.teacher), "cls", "cpu"), load_image_processor(str(assets.teacher))
    with torch.no_grad():
        uninterrupted = image_features(teacher, processor, distinct, 8, 0, False)
    uninterrupted = torch.cat([uninterrupted, uninterrupted[:3]])

    def served() -> torch.Tensor:
        return teacher_cache.stored_image_features(teacher, processor, images, 8, teacher_cache.feature_store(teacher),
                                                   persist=True, workers=0, progress=False)

    with monkeypatch.context() as killing, torch.no_grad():
        kill_after(killing, VisionTeacher, "forward", 1, before=True)
        with pytest.raises(Killed):
            served()
    new_process(monkeypatch)
    rows = teacher_rows(monkeypatch)
    capsys.readouterr()
    with torch.no_grad():
        assert torch.equal(served(), uninterrupted)
    assert rows == [4] and "continuing from 8 of 12 rows" in capsys.readouterr().out


def test_a_killed_selection_continues_from_its_kept_batches(assets, tmp_path: Path, monkeypatch, capsys) -> None:
    """12 pairs in batches of 4 through the language model: killed after 2 batches, the second file then truncated:
    the rerun runs 2 batches (continuing from 4 of 12 rows), and its scores and each pair's overlap equal an
    uninterrupted pass bit for bit."""
    from llamafactory_hera_patches.tools.model_data import parse_recipe

    recipe_args = parse_recipe(base_recipe(assets, "qwen2_5_vl", "/unused"))
    options = SelectionOptions(num_samples=12, k=5, teacher=str(assets.teacher), device="cpu", progress=False,
                               batch_size=4)
    pairs, _ = prepare(recipe_args, options)
    uninterrupted = score_head_neighbours(recipe_args, options, pairs)
    kept = tmp_path / "kept"
    with monkeypatch.context() as killing:
        kill_after(killing, collect.PooledInputRecorder, "flush", 2, before=False)
        with pytest.raises(Killed):
            score_head_neighbours(recipe_args, options, pairs, kept)
    assert sorted(path.name for path in kept.iterdir()) == ["0.pt", "1.pt"]
    truncate(kept / "1.pt")
    flushes = kill_after(monkeypatch, collect.PooledInputRecorder, "flush", None)
    capsys.readouterr()
    again = score_head_neighbours(recipe_args, options, pairs, kept)
    assert len(flushes) == 2 and "continuing from 4 of 12 rows" in capsys.readouterr().out
    assert torch.equal(again.scores, uninterrupted.scores)
    assert torch.equal(again.overlaps, uninterrupted.overlaps)
