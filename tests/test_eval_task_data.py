"""A preset whose tasks cannot run here is refused before any model loads: offline, a task whose
dataset the datasets cache lacks (read from the library's task YAML, without importing it), unless its results are
in the eval cache; the line names each task, its dataset, the cache and the one command that fetches them, and the
--tasks that can run. Through the real command line in this process (the model loader replaced by a failure)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_eval_cli import error_in_process


@pytest.fixture
def recorded_run(tmp_path: Path) -> Path:
    """A HeRA run record on LLaVA-1.5-7B (a hub id: nothing is loaded, the refusal comes first) and its adapter."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    host = {"model_name_or_path": "llava-hf/llava-1.5-7b-hf", "template": "llava", "seed": 0}
    (run_dir / "hera_run.json").write_text(json.dumps({"stage": "hera", "host": host}), encoding="utf-8")
    (run_dir / "adapter_config.json").write_text("{}", encoding="utf-8")
    return run_dir


@pytest.mark.parametrize(("tasks", "refused", "fetched"), [
    ("rah", ["vqav2_val", "textvqa_val_ocr", "gqa", "pope", "mme", "mmbench_en_dev_static", "scienceqa_img",
             "seedbench"], ["lmms-lab-encoder/VQAv2", "lmms-lab-encoder/textvqa", "'lmms-lab-encoder/GQA', "
                            "'testdev_balanced_instructions', cache_dir=",
                            "'lmms-lab-encoder/GQA', 'testdev_balanced_images')",
                            "lmms-lab-encoder/POPE"]),
    ("vision-centric,demo", ["cv_bench_2d", "cv_bench_3d", "mmvp", "realworldqa"],
     ["'nyu-visionx/CV-Bench', '2D'", "'nyu-visionx/CV-Bench', '3D'", "lmms-lab-eval/MMVP"])])
def test_a_preset_without_its_datasets_offline_is_refused_before_loading(
        recorded_run: Path, tasks: str, refused: list[str], fetched: list[str], capfd, monkeypatch) -> None:
    """Offline (the tests' HF_HUB_OFFLINE=1, an empty HF_HOME), every benchmark's dataset is missing from the datasets
    cache: one line names each task, its dataset, the cache folder and the one command that fetches them, and the
    --tasks that can run; no model is loaded (the loader is never called)."""
    from llamafactory_hera.evaluation import runner

    def load_engine(*_: Any) -> None:
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(runner, "load_engine", load_engine)
    line = error_in_process(capfd, str(recorded_run), "--base", "--tasks", tasks, reads_registry=True)
    assert all(f" {task} (" in line for task in refused), line
    assert "offline (HF_HUB_OFFLINE=1), the datasets cache (" in line and "lacks the dataset of " in line
    assert 'HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0 python -c "import datasets; datasets.load_dataset(' in line
    assert all(words in line for words in fetched), line
    left = line.rsplit("; ", 1)[-1]
    assert left == ("or leave them out: --tasks llamafactory_hera_demo_mllm" if "demo" in tasks
                    else "no task of --tasks can run here until then")


def prepared(folder: Path) -> Path:
    """``folder`` as a completed ``datasets`` preparation leaves it: with its ``dataset_info.json``."""
    folder.mkdir(parents=True)
    (folder / "dataset_info.json").write_text("{}", encoding="utf-8")
    return folder


def test_a_prepared_dataset_or_cached_results_pass_the_offline_check(tmp_path: Path, monkeypatch) -> None:
    """The folder the datasets library's offline load reads (``<owner>___<name>/<config>/<version>/<hash>``) lets the
    task through, as do its results already in the eval cache for every model."""
    from llamafactory_hera.evaluation import presets
    from llamafactory_hera.runtime.errors import RecipeError

    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    monkeypatch.delenv("LMMS_EVAL_DATASETS_CACHE", raising=False)
    planned = presets.plan_tasks("vision-centric", "mllm", "hera", None)
    with pytest.raises(RecipeError, match="lacks the dataset of cv_bench_2d [(]nyu-visionx/CV-Bench, 2D[)]"):
        presets.check_task_setup(planned)
    for folder in ("nyu-visionx___cv-bench/2D/0.0.0/abc", "nyu-visionx___cv-bench/3D/0.0.0/abc",
                   "lmms-lab-eval___mmvp/default/0.0.0/abc"):
        prepared(tmp_path / "datasets" / folder)
    with pytest.raises(RecipeError) as refused:
        presets.check_task_setup(planned)
    assert "lacks the dataset of realworldqa (lmms-lab-encoder/RealWorldQA). Fetch" in str(refused.value)
    presets.check_task_setup(planned, cached=lambda task: task.name == "realworldqa")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    presets.check_task_setup(presets.plan_tasks("rah", "mllm", "rah", None))  # online: lmms-eval fetches them


def test_an_interrupted_preparation_is_not_a_cached_dataset(tmp_path: Path) -> None:
    """``datasets`` prepares into ``<hash>.incomplete`` and writes ``dataset_info.json`` when done: an interrupted
    load's folder, or a hash folder without that file, is not a dataset its offline load can read."""
    from llamafactory_hera.evaluation.task_data import is_cached

    dataset = ("nyu-visionx/CV-Bench", "2D")
    (tmp_path / "nyu-visionx___cv-bench/2D/0.0.0/abc").mkdir(parents=True)
    assert not is_cached(dataset, tmp_path)
    prepared(tmp_path / "nyu-visionx___cv-bench/2D/0.0.0/def.incomplete")
    assert not is_cached(dataset, tmp_path)
    prepared(tmp_path / "nyu-visionx___cv-bench/2D/0.0.0/def")
    assert is_cached(dataset, tmp_path)


def test_the_check_reads_the_folder_lmms_eval_loads_from(tmp_path: Path, monkeypatch) -> None:
    """lmms-eval 0.7.3 passes its own cache_dir: ``LMMS_EVAL_DATASETS_CACHE``, else the datasets cache, else (that on
    a network filesystem) ``<local scratch>/lmms_eval_hf_datasets/$USER``; the check reads that folder, as lmms-eval's
    own resolution gives it, and the fetch command caches there."""
    from lmms_eval.api import task as lmms_task
    from lmms_eval.caching import fs_detect

    from llamafactory_hera.evaluation import presets
    from llamafactory_hera.evaluation.task_data import datasets_cache
    from llamafactory_hera.runtime.errors import RecipeError

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    monkeypatch.delenv("LMMS_EVAL_DATASETS_CACHE", raising=False)
    monkeypatch.setenv("LMMS_LOCAL_CACHE", str(tmp_path / "scratch"))
    monkeypatch.setenv("USER", "someone")
    (tmp_path / "scratch").mkdir()
    monkeypatch.setattr(fs_detect, "detect_fs_type", lambda path: fs_detect.FsType.REMOTE)
    monkeypatch.setattr(lmms_task, "detect_fs_type", lambda path: fs_detect.FsType.REMOTE)
    local = tmp_path / "scratch" / "lmms_eval_hf_datasets" / "someone"
    lmms_task._resolve_hf_datasets_cache_dir.cache_clear()
    try:
        assert datasets_cache("lmms_eval") == local == Path(lmms_task._resolve_hf_datasets_cache_dir())
        lmms_task._resolve_hf_datasets_cache_dir.cache_clear()
        monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path / "explicit"))
        assert datasets_cache("lmms_eval") == tmp_path / "explicit" == Path(lmms_task._resolve_hf_datasets_cache_dir())
    finally:
        lmms_task._resolve_hf_datasets_cache_dir.cache_clear()
    assert datasets_cache("lm_eval") == tmp_path / "hf" / "datasets"
    planned = presets.plan_tasks("vision-centric", "mllm", "hera", None)
    for folder in ("nyu-visionx___cv-bench/2D/0.0.0/abc", "nyu-visionx___cv-bench/3D/0.0.0/abc",
                   "lmms-lab-eval___mmvp/default/0.0.0/abc", "lmms-lab-encoder___real_world_qa/default/0.0.0/abc"):
        prepared(tmp_path / "hf" / "datasets" / folder)  # the datasets default: not where lmms-eval reads
    with pytest.raises(RecipeError) as refused:
        presets.check_task_setup(planned)
    explicit = str(tmp_path / "explicit")
    assert f"the datasets cache ({explicit}) lacks" in str(refused.value)
    assert f"datasets.load_dataset('nyu-visionx/CV-Bench', '2D', cache_dir={explicit!r})" in str(refused.value)
    for folder in ("nyu-visionx___cv-bench/2D/0.0.0/abc", "nyu-visionx___cv-bench/3D/0.0.0/abc",
                   "lmms-lab-eval___mmvp/default/0.0.0/abc", "lmms-lab-encoder___real_world_qa/default/0.0.0/abc"):
        prepared(tmp_path / "explicit" / folder)
    presets.check_task_setup(planned)


def test_a_second_dataset_a_task_loads_itself_is_checked_in_its_own_cache(tmp_path: Path, monkeypatch) -> None:
    """GQA's documents take their images from ``lmms-lab-encoder/GQA`` ``testdev_balanced_images``, loaded by its
    utils.py with the datasets default cache: checked there, and fetched without lmms-eval's cache_dir, beside the
    YAML's dataset fetched into lmms-eval's folder."""
    from llamafactory_hera.evaluation import presets
    from llamafactory_hera.runtime.errors import RecipeError

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path / "lmms"))
    planned = [task for task in presets.plan_tasks("general", "mllm", "hera", None) if task.name == "gqa"]
    prepared(tmp_path / "lmms" / "lmms-lab-encoder___gqa/testdev_balanced_instructions/0.0.0/abc")
    with pytest.raises(RecipeError) as refused:
        presets.check_task_setup(planned)
    line = str(refused.value)
    assert f"the datasets cache ({tmp_path / 'hf' / 'datasets'}) lacks the dataset of gqa (lmms-lab-encoder/GQA, " \
           "testdev_balanced_images)" in line, line
    assert "datasets.load_dataset('lmms-lab-encoder/GQA', 'testdev_balanced_images')\"" in line, line
    prepared(tmp_path / "hf" / "datasets" / "lmms-lab-encoder___gqa/testdev_balanced_images/0.0.0/abc")
    presets.check_task_setup(planned)
    (tmp_path / "lmms" / "lmms-lab-encoder___gqa/testdev_balanced_instructions/0.0.0/abc/dataset_info.json").unlink()
    with pytest.raises(RecipeError, match="lacks the dataset of gqa [(]lmms-lab-encoder/GQA, "
                                          "testdev_balanced_instructions[)]"):
        presets.check_task_setup(planned)
