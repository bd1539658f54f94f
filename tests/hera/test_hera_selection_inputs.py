"""What `select` reads before scoring: pairs from rows that share images, and the identity of local folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llamafactory_hera.hera.selection import collect
from llamafactory_hera.hera.selection.select import path_fingerprint


def _rows(images_per_row: list[str]) -> list[dict]:
    return [{"_prompt": [{"role": "user", "content": "<image>Describe."}], "_images": [image],
             "_response": [{"role": "assistant", "content": f"caption {i}"}]} for i, image in enumerate(images_per_row)]


def test_too_few_distinct_images_is_reported_as_such() -> None:
    """200 rows over 8 images (as LLaVA reuses COCO): the error counts both and says what counts once."""
    usable = collect.usable_pairs(_rows([f"/img/{i % 8}.jpg" for i in range(200)]))
    distinct = collect.distinct_image_pairs(usable, seed=0)
    assert (len(usable), len(distinct)) == (200, 8)
    with pytest.raises(ValueError) as info:
        collect.sample_pairs(distinct, 1000, 0, 10, "shared_coco", len(usable))
    message = str(info.value)
    # was: "only 8 usable image-caption pairs (rows with an image and a non-empty answer)", with 200 such rows
    assert "only 8 usable image-caption pairs with distinct images, from 200 row(s)" in message
    assert "rows that share an image count once" in message and "at least 11" in message


def test_a_teacher_folder_written_with_a_tilde_is_fingerprinted_by_its_files(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "dinov2"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    monkeypatch.setenv("HOME", str(tmp_path))
    before = path_fingerprint("~/dinov2")
    assert before == path_fingerprint(str(folder)) and not before.startswith("id:")  # was "id:~/dinov2"
    (folder / "model.safetensors").write_bytes(b"0" * 8)
    os.utime(folder / "model.safetensors", ns=(1, 1))
    assert path_fingerprint("~/dinov2") != before  # new weights invalidate a cached auto selection
