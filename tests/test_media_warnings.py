"""LLaMA-Factory's converter prints one "Media ... does not exist in `media_dir`" warning per missing image
(32 on the tiny dataset, hundreds on a real one) above the plugin's one-line refusal of the first missing file. While
the plugin checks its image files they are held: dropped under the refusal, logged as the host logs them when the check
passes (the real converter, in this process and in its worker processes). The line count of the real
``llamafactory-cli`` process is pinned in tests/test_host_key_refusals.py."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import pytest

from conftest import base_recipe, run_train
from llamafactory_hera.runtime.errors import RecipeError
from llamafactory_hera_patches.data.media_warnings import CONVERTER_LOGGER, is_media_warning, media_warnings_held
from llamafactory_hera_patches.tools.model_data import load_aligned_rows, parse_recipe


class _Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def kept() -> Any:
    from llamafactory.extras.logging import warning_rank0_once

    warning_rank0_once.cache_clear()  # the converter warns once per message and process (workers: as forked)
    handler, logger = _Kept(), logging.getLogger(CONVERTER_LOGGER)
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def _without_images(assets: Any, tmp_path: Path, workers: int) -> Any:
    """The tiny dataset's copy without its images (each run a new folder: the converter warns once per message)."""
    copy = tmp_path / "data"
    shutil.copytree(assets.dataset_dir, copy)
    shutil.rmtree(copy / "images")
    return parse_recipe(base_recipe(assets, "qwen2_5_vl", tmp_path / "out", dataset_dir=str(copy),
                                    media_dir=str(copy), overwrite_cache=True, preprocessing_num_workers=workers))


@pytest.mark.parametrize("workers", [1, 2])
def test_media_warnings_are_dropped_under_the_refusal(workers: int, assets: Any, tmp_path: Path, kept: Any) -> None:
    recipe = _without_images(assets, tmp_path, workers)
    with pytest.raises(RecipeError, match="the check"), media_warnings_held() as held:
        aligned = load_aligned_rows(recipe, 0)
        assert len(aligned) == 32 and len(held.read_text().splitlines()) == 32  # held, not lost
        raise RecipeError("the check")
    assert [r.getMessage() for r in kept.records if is_media_warning(r.getMessage())] == []


def test_media_warnings_are_logged_as_the_host_logs_them_when_the_check_passes(assets: Any, tmp_path: Path,
                                                                               kept: Any) -> None:
    recipe = _without_images(assets, tmp_path, 2)  # workers: the lines of both worker processes come back
    with media_warnings_held():
        load_aligned_rows(recipe, 0)
        assert kept.records == []
    messages = [r.getMessage() for r in kept.records]
    assert sorted(messages) == [f"Media images/{i:04d}.png does not exist in `media_dir`. Use original path."
                                for i in range(32)]
    assert {(r.name, r.levelname) for r in kept.records} == {(CONVERTER_LOGGER, "WARNING")}
    with pytest.raises(OSError), media_warnings_held():  # another failure: the lines come above it
        logging.getLogger(CONVERTER_LOGGER).warning("Media x.png does not exist in `media_dir`. Use original path.")
        raise OSError("disk")
    assert kept.records[-1].getMessage().startswith("Media x.png")


def test_hera_names_a_missing_image_without_the_converters_lines(assets: Any, tmp_path: Path, kept: Any) -> None:
    """HeRA's own check of its training images (``hera/preparation.py``) holds them too; RAH-LoRA's, through the real
    process: tests/test_host_key_refusals.py."""
    copy = tmp_path / "data"
    shutil.copytree(assets.dataset_dir, copy)
    shutil.rmtree(copy / "images")
    proc = run_train(base_recipe(assets, "qwen2_5_vl", tmp_path / "out", dataset_dir=str(copy)), tmp_path,
                     check=False)
    assert proc.returncode == 1 and proc.stderr.rstrip().splitlines()[-1].startswith(
        "[llamafactory-hera] error: image 'images/0000.png' of training dataset row 0 (hera_demo: "
        f"{copy}/hera_demo.json) does not exist"), proc.stderr
    assert not [r for r in kept.records if is_media_warning(r.getMessage())]
    assert "does not exist in `media_dir`" not in proc.stdout + proc.stderr


def test_a_process_holds_a_bounded_number_of_lines_and_says_what_it_left_out(monkeypatch: pytest.MonkeyPatch,
                                                                              kept: Any) -> None:
    """A dataset whose every path resolves outside ``media_dir`` warns for each image and trains: the hold keeps the
    first lines of each process (not a file and a dict of 665k), and one line says there were more."""
    from llamafactory_hera_patches.data import media_warnings

    monkeypatch.setattr(media_warnings, "MAX_HELD", 5)
    with media_warnings_held() as held:
        for i in [*range(8), 0, 1]:  # repeats are held once
            logging.getLogger(CONVERTER_LOGGER).warning(f"Media {i}.png does not exist in `media_dir`. Use original "
                                                        "path.")
        assert len(held.read_text().splitlines()) == 6  # the first 5, and one mark
    messages = [r.getMessage() for r in kept.records]
    assert messages[:5] == [f"Media {i}.png does not exist in `media_dir`. Use original path." for i in range(5)]
    assert messages[5:] == ["More files than these 5 do not exist in `media_dir` (each process shows its first 5); "
                            "LLaMA-Factory used their original paths."]
