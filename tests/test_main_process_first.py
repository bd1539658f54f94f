"""HeRA's and HARC's start-up data work (aligning the datasets with ``preprocessing_num_workers``
processes, HeRA's check of every row's image) runs main process first, as LLaMA-Factory loads a dataset: on a node of
8 ranks the others then read the datasets cache the first wrote, instead of 8 x ``preprocessing_num_workers``
processes at once on one cache."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import base_recipe


def test_hera_aligns_and_checks_images_main_process_first(assets: Any, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import llamafactory.data.loader as loader

    import llamafactory_hera.hera.preparation_checks as preparation_checks
    from llamafactory_hera.hera.preparation_checks import checked_image_rows
    from llamafactory_hera_patches.tools.model_data import parse_recipe, training_args_for_reading

    recipe = parse_recipe(base_recipe(assets, "qwen2_5_vl", tmp_path / "out"))
    training_args = training_args_for_reading(0)  # the run's arguments, with a main_process_first that records
    training_args.do_train = True
    inside: list[str] = []
    events: list[tuple[str, Any]] = []

    @contextlib.contextmanager
    def main_process_first(desc: str = "work", local: bool = True) -> Iterator[None]:
        inside.append(desc)
        try:
            yield
        finally:
            inside.pop()

    training_args.main_process_first = main_process_first
    merged, count = loader._get_merged_dataset, preparation_checks.count_image_rows

    def spy_merged(*args: Any, **kwargs: Any) -> Any:
        events.append(("align", list(inside), args[3] is training_args))
        return merged(*args, **kwargs)

    def spy_count(*args: Any, **kwargs: Any) -> Any:
        events.append(("images", list(inside)))
        return count(*args, **kwargs)

    monkeypatch.setattr(loader, "_get_merged_dataset", spy_merged)
    monkeypatch.setattr(preparation_checks, "count_image_rows", spy_count)
    rows, counts, aligned = checked_image_rows(recipe.model_args, recipe.data_args, recipe.finetuning_args,
                                               training_args)
    assert counts is not None and counts.image_rows == len(aligned) and rows
    desc = ["align the dataset and check its images"]
    # the run's own arguments reach the loader: its local_process_index != 0 rule reads the first rank's cache
    assert events == [("align", desc, True), ("images", desc)], events


def test_harc_loads_its_role_datasets_main_process_first(harc_assets: Any, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """HARC replaces LLaMA-Factory's get_dataset (whose loading runs main process first) with its own role loading,
    which ran on every rank at once; LLaMA-Factory calls it before loading the model."""
    import llamafactory.data.loader as loader
    import llamafactory.train.sft.workflow as workflow
    from llamafactory.train.tuner import run_exp
    from transformers import TrainingArguments

    from conftest import harc_recipe

    original = TrainingArguments.main_process_first
    inside: list[str] = []
    events: list[tuple[list[str], str]] = []

    @contextlib.contextmanager
    def recording(self: Any, local: bool = True, desc: str = "work") -> Iterator[None]:
        inside.append(desc)
        try:
            with original(self, local=local, desc=desc):
                yield
        finally:
            inside.pop()

    merged = loader._get_merged_dataset

    def spy_merged(*args: Any, **kwargs: Any) -> Any:
        events.append((list(inside), str(args[3].output_dir)))
        return merged(*args, **kwargs)

    def loaded(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model loads after the datasets")

    monkeypatch.setattr(TrainingArguments, "main_process_first", recording)
    monkeypatch.setattr(loader, "_get_merged_dataset", spy_merged)
    monkeypatch.setattr(workflow, "load_model", loaded)
    out = tmp_path / "out"
    with pytest.raises(AssertionError, match="the model loads after the datasets"):
        run_exp(harc_recipe(harc_assets, "llama3", out))
    assert len(events) >= 3, events  # harmful, harmless, pseudo (and completions)
    assert all(where == ["load HARC's role datasets"] and output == str(out) for where, output in events), events
