"""Bad images and image rows are one line naming the file or the row, before the model loads, and an
unwritable cache folder costs only its sharing. Before: a truncated PNG ended in ``OSError: Truncated File Read``
(477 lines, no file named), a row with one image more than its ``<image>`` marks in LLaMA-Factory's ``ValueError``
(no row or file named), ``cutoff_len: 8`` in a ``shape mismatch`` of Qwen3-VL's rope index after the model loaded
(631 lines), and ``LLAMAFACTORY_HERA_CACHE`` naming a file stopped ``hera_heads: auto`` after the model loaded
(``NotADirectoryError``, 726 lines). Through LLaMA-Factory's real ``run_exp`` (its ``load_model`` refused, so a
check that came after the model loaded fails the test) and one real ``llamafactory-cli train`` process."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import ImageFile
from test_launch_refusals import _refused

from conftest import base_recipe, refuse_loading, run_train, run_verb
from llamafactory_hera.demo.rah import build_rah_recipe
from llamafactory_hera.recipe.dataset_info import image_problem

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a model fails the test (the tokenizer loads: LLaMA-Factory tokenizes the data with it first); PIL as
    in a training process (lmms-eval, which other tests of the process import, makes PIL load truncated images)."""
    refuse_loading(monkeypatch, "load_model")
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)


def _data(assets: Any, tmp_path: Path, edit: Callable[[list[dict[str, Any]], Path], None]) -> str:
    """A copy of the tiny image-caption dataset, its rows and files edited."""
    folder = tmp_path / "data"
    shutil.copytree(assets.dataset_dir, folder)
    rows = json.loads((folder / "hera_demo.json").read_text())
    edit(rows, folder)
    (folder / "hera_demo.json").write_text(json.dumps(rows))
    return str(folder)


def _junk_png(rows: list[dict[str, Any]], folder: Path) -> None:  # PIL's open: OSError "Truncated File Read"
    (folder / "images" / "0003.png").write_bytes(PNG_SIGNATURE + b"junk" * 20)


def _half_png(rows: list[dict[str, Any]], folder: Path) -> None:  # opens; its pixels: "image file is truncated"
    path = folder / "images" / "0003.png"
    path.write_bytes(path.read_bytes()[:-40])


def _one_image_too_many(rows: list[dict[str, Any]], folder: Path) -> None:
    rows[4]["images"].append("images/0005.png")


def test_image_problem_decodes_what_open_alone_passes(assets: Any, tmp_path: Path) -> None:
    good = sorted((assets.dataset_dir / "images").glob("*.png"))[0]
    half = tmp_path / "half.png"
    half.write_bytes(good.read_bytes()[:-40])
    junk = tmp_path / "junk.png"
    junk.write_bytes(PNG_SIGNATURE + b"junk" * 20)
    assert image_problem(str(good), decode=True) is None and image_problem(str(half), decode=False) is None
    assert image_problem(str(half), decode=True) == image_problem(str(junk), decode=True) == "unreadable"
    assert image_problem(str(tmp_path / "none.png"), decode=True) == "missing"


# name -> (stage, dataset edit or None, recipe overrides, the message's start, its end)
CASES: dict[str, tuple[str, Any, dict[str, Any], str, str]] = {
    "hera: a truncated PNG": (
        "hera", _half_png, {}, "image '", "/images/0003.png' of training dataset row 3 (hera_demo: "
        "{data}/hera_demo.json) cannot be decoded (truncated or not an image); replace the file or remove the row "
        "(LLaMA-Factory's preprocessing: OSError: image file is truncated)"),
    "rah: a truncated PNG": (
        "rah", _half_png, {}, "image '", "/images/0003.png' of training dataset row 3 (hera_demo: "
        "{data}/hera_demo.json) cannot be decoded (truncated or not an image); replace the file or remove the row"),
    "hera: one image more than <image> marks": (
        "hera", _one_image_too_many, {}, "training dataset row 4 (hera_demo: {data}/hera_demo.json) has 2 image(s) "
        "and 1 <image> mark(s) in its messages; LLaMA-Factory needs one mark per image", "or remove the row"),
    "rah: one image more than <image> marks": (
        "rah", _one_image_too_many, {}, "training dataset row 4 (hera_demo: {data}/hera_demo.json) "
        "has 2 image(s) and 1 <image> mark(s)", "or remove the row"),
    "hera: cutoff_len shorter than an image's tokens": (
        "hera", None, {"cutoff_len": 8}, "cutoff_len: 8 cuts the image tokens of training dataset row 0 (hera_demo: "
        "{data}/hera_demo.json): its 1 image(s) take 4 tokens and 2 are left, so the model's image features would "
        "not match its tokens. Raise cutoff_len to at least ", " (that row's length), or lower image_max_pixels."),
}


@pytest.mark.usefixtures("no_model_load")
@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_image_row_is_one_line_before_the_model_loads(case: str, assets: Any, tmp_path: Path) -> None:
    stage, edit, overrides, start, end = CASES[case]
    data = _data(assets, tmp_path, edit) if edit else str(assets.dataset_dir)
    recipe = (base_recipe(assets, "qwen3_vl", tmp_path / "out") if stage == "hera" else
              build_rah_recipe(assets, "qwen3_vl", tmp_path / "out"))
    recipe.update(dataset_dir=data, overwrite_cache=True, **overrides)
    message = _refused(recipe)
    assert message.startswith(start.format(data=data)) and message.endswith(end.format(data=data)), message


def test_a_png_pil_cannot_open_in_a_preprocessing_worker_is_one_line(assets: Any, tmp_path: Path) -> None:
    """``preprocessing_num_workers: 2``: PIL's error is raised in a worker that datasets forks (its traceback is the
    error's cause). In a real process: a fork from the test process, which earlier tests left with many threads, twice
    left a worker blocked on a multiprocessing semaphore while the test waited for it (CI hung); a hung process here
    is killed at the timeout and the test fails instead."""
    data = _data(assets, tmp_path, _junk_png)
    proc = run_train(base_recipe(assets, "qwen3_vl", tmp_path / "out", dataset_dir=data, overwrite_cache=True,
                                 preprocessing_num_workers=2), tmp_path, check=False, process=True, timeout=300)
    last = (proc.stdout + proc.stderr).rstrip("\n").split("\n")[-1]
    assert proc.returncode == 1 and "trainable params" not in proc.stdout + proc.stderr, last
    assert last.startswith("[llamafactory-hera] error: image '") and last.endswith(
        f"/images/0003.png' of training dataset row 3 (hera_demo: {data}/hera_demo.json) cannot be decoded (truncated "
        "or not an image); replace the file or remove the row (LLaMA-Factory's preprocessing: OSError: Truncated File "
        "Read)"), last


def test_the_cli_names_a_truncated_png_in_one_line(assets: Any, tmp_path: Path) -> None:
    """The real process: exit code 1, no traceback, the message last (LLaMA-Factory's own lines above it, its
    processor's configuration among them: 396 lines)."""
    data = _data(assets, tmp_path, _half_png)
    proc = run_train(base_recipe(assets, "qwen3_vl", tmp_path / "out", dataset_dir=data, overwrite_cache=True),
                     tmp_path, check=False, process=True)
    lines = (proc.stdout + proc.stderr).rstrip("\n").split("\n")
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr, "\n".join(lines[-30:])
    assert lines[-1].startswith("[llamafactory-hera] error: image '") and "row 3" in lines[-1], lines[-1]
    assert not any("trainable params" in line for line in lines)  # the model never loaded


def test_a_cache_folder_that_is_a_file_is_said_once_and_every_command_goes_on(assets: Any, tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch,
                                                                              capfd: pytest.CaptureFixture[str]
                                                                              ) -> None:
    """``select`` and a training run with ``hera_heads: auto`` (a scoring copy of the model, then training): both
    finish, each saying once that the folder cannot be written."""
    import yaml

    from llamafactory_hera.hera import teacher_cache

    cache = tmp_path / "cache_file"
    cache.write_text("not a folder")
    monkeypatch.setenv("LLAMAFACTORY_HERA_CACHE", str(cache))
    recipe = base_recipe(assets, "qwen2_5_vl", tmp_path / "out", hera_heads="auto", hera_select_samples=12,
                         hera_k=5, hera_select_num_heads=2, max_steps=1)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    said = "[llamafactory-hera] warning: cannot write the cache folder " + str(cache)
    proc = run_verb(capfd, "select", path, "--samples", "12", "--k", "5", "--device", "cpu", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (proc.stdout + proc.stderr).count(said) == 1, proc.stdout
    monkeypatch.setattr(teacher_cache, "_unwritable_said", set())  # the next command: a new process
    proc = run_train(recipe, tmp_path / "train", env={"LLAMAFACTORY_HERA_CACHE": str(cache)})
    output = proc.stdout + proc.stderr
    assert output.count(said) == 1 and "hera_heads: auto -> [" in output, output[-3000:]
    assert "NotADirectoryError" in output.split(said)[1].split("\n")[0]


@pytest.mark.usefixtures("no_model_load")
@pytest.mark.parametrize("family", ["qwen3_vl", "llava"])
def test_a_cutoff_len_that_cuts_text_only_passes_the_check(family: str, assets: Any, tmp_path: Path) -> None:
    """Rows truncated after their image tokens (the answer cut) are not refused: the run goes on to load the model."""
    from llamafactory.train.tuner import run_exp

    cutoff = {"qwen3_vl": 24, "llava": 100}[family]  # rows of 37 / 107 tokens, 4 of the image near their start
    with pytest.raises(AssertionError, match="the model was loaded before the error"):
        run_exp(base_recipe(assets, family, tmp_path / "out", cutoff_len=cutoff, overwrite_cache=True))
