"""The paper's experiment (Table 2) end to end on tiny models, as the recipes' headers run it.

For a tiny Qwen3 + SigLIP (recipes/llava15/qwen3_8b_stage*.yaml) and a tiny Llama in Vicuna's format + CLIP
(vicuna_7b_stage*.yaml): ``llamafactory-hera compose``; ``select`` with the header's flags (``--dry-run``) on the
composed model in text mode, whose scores are those of ``select`` on the LLM alone; ``data check`` of both stages;
stage 1 then stage 2 with ``stage: hera`` through LLaMA-Factory's ``run_exp`` (what ``llamafactory-cli train``
calls) on tiny files in the 558k and 665k formats, with an image folder and text-only rows; the header's twin of both
stages (``stage=sft``); ``eval`` of stage 2 against the twin's on the offline demo tasks; the stage chains the run
records give Table 2's title. Each stage's recipe is the shipped one, loaded, with only sizes, paths, the tiny teacher
and the CPU's settings changed (:func:`tiny_recipe`).

Cost: one chain per family, its steps run once in a module fixture, each verb in this process; the fixture prints
the seconds of each step (``-s``): the module takes about 20 s on an idle 2-core machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from test_hera_llava15_recipes import _header_commands

from conftest import REPO, read_trainer_log, run_train, run_verb
from llamafactory_hera.evaluation.table2 import chain_words, markdown_lines, table2
from llamafactory_hera.hera.selection.command import record_paths
from llamafactory_hera.runtime.run_record import RUN_RECORD, read_record
from llamafactory_hera_patches.data.llava_templates import FAMILY_TEMPLATES
from llamafactory_hera_testing.llava_data import keep_loadable_rows, write_tree
from llamafactory_hera_testing.parts import build_part
from llamafactory_hera_testing.resume import assert_resumed_equals_whole

# family -> (tiny LLM part, tiny vision part, the shipped recipes' stem)
FAMILIES = {"qwen3": ("qwen3", "siglip", "qwen3_8b"), "vicuna": ("llama", "clip", "vicuna_7b")}
CAPTIONS = 16  # rows of the tiny 558k file, each its own image
# what the tiny chain changes in the shipped recipes: sizes, paths (set per run), the tiny teacher, CPU precision
TINY = {"hera_k": 2, "hera_select_samples": CAPTIONS, "hera_select_batch_size": 4, "gradient_accumulation_steps": 1,
        "max_steps": 2, "logging_steps": 1, "save_steps": 100, "cutoff_len": 256, "preprocessing_num_workers": 1,
        "dataloader_num_workers": 0, "bf16": False, "plot_loss": False, "overwrite_cache": True}
# HeRA's contrastive batch, at least hera_k + 1 images: 4 captions in stage 1; in stage 2 the whole mixture (6 rows
# once its bad images are dropped: 4 with an image, 2 text-only)
BATCH = {1: 4, 2: 6}
DROPPED = ("deepspeed",)  # one CPU process: no DeepSpeed
PROJECTOR, VISION, LANGUAGE = "multi_modal_projector.", "vision_tower.", "language_model."  # checkpoint key prefixes


@dataclass
class Chain:
    """One family's chain: its folders, what each verb printed, and the seconds of each step."""

    family: str
    root: Path
    llm: Path
    composed: Path
    template: str
    selection: dict[str, Any] = field(default_factory=dict)  # "composed" / "llm" -> select's record
    data_checks: dict[int, str] = field(default_factory=dict)  # stage -> what `data check` printed
    runs: dict[str, Path] = field(default_factory=dict)  # "stage1/hera", "stage1/sft", ... -> output_dir
    eval_record: dict[str, Any] = field(default_factory=dict)
    eval_out: str = ""
    seconds: dict[str, float] = field(default_factory=dict)


def shipped(stem: str, stage: int) -> dict[str, Any]:
    return yaml.safe_load((REPO / "recipes" / "llava15" / f"{stem}_stage{stage}.yaml").read_text(encoding="utf-8"))


def tiny_recipe(stem: str, number: int, tree: Any, teacher: Path, **keys: Any) -> dict[str, Any]:
    """The shipped recipe of stage ``number`` with :data:`TINY`, the tiny data's folders and ``keys`` (model, output,
    heads, the twin's ``stage``)."""
    recipe = {k: v for k, v in shipped(stem, number).items() if k not in DROPPED}
    media_dir = tree.pretrain / "images" if number == 1 else tree.llava
    tiny = {**TINY, "per_device_train_batch_size": BATCH[number], "hera_teacher": str(teacher),
            "dataset_dir": str(tree.data), "media_dir": str(media_dir)}
    return {**recipe, **tiny, **{k: str(v) if isinstance(v, Path) else v for k, v in keys.items()}}


def header_flags(stem: str) -> dict[str, Any]:
    """What the chain takes from the shipped stage-1 recipe's header: ``select``'s flags after the recipe and the
    twin's overrides other than its folders; ``eval``'s form is checked (``RUN --baseline TWIN --tasks ...``, run
    here with the demo tasks)."""
    commands = _header_commands(f"llava15/{stem}_stage1.yaml")
    select = next(c for c in commands if c[:2] == ["llamafactory-hera", "select"])
    twin = next(c for c in commands if c[:2] == ["llamafactory-cli", "train"] and len(c) > 3)
    evaluate = next(c for c in commands if c[:2] == ["llamafactory-hera", "eval"])
    overrides = dict(arg.split("=", 1) for arg in twin[3:])
    assert evaluate[3] == "--baseline" and evaluate[5] == "--tasks" and len(evaluate) == 7
    return {"select": select[3:], "twin": {k: v for k, v in overrides.items()
                                           if k not in ("model_name_or_path", "output_dir")}}


@contextlib.contextmanager
def timed(seconds: dict[str, float], step: str) -> Iterator[None]:
    """Adds the block's wall seconds to ``seconds[step]``."""
    started = time.perf_counter()
    try:
        yield
    finally:
        seconds[step] = seconds.get(step, 0.0) + time.perf_counter() - started


class DescriptorCapture:
    """What :func:`run_verb` reads of pytest's ``capfd`` (``readouterr``), for a module fixture (``capfd`` is a test's):
    descriptors 1 and 2 write to two files while :func:`descriptors_captured` lasts (sharing their offsets); each call
    returns what was written since the last and leaves the offsets at the end."""

    def __init__(self, out: Any, err: Any) -> None:
        self.files, self.read = (out, err), [0, 0]

    def readouterr(self) -> Any:
        texts = []
        for index, file in enumerate(self.files):
            file.seek(self.read[index])
            texts.append(file.read())
            self.read[index] = file.tell()
        return type("Captured", (), {"out": texts[0], "err": texts[1]})


@contextlib.contextmanager
def descriptors_captured() -> Iterator[DescriptorCapture]:
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as out, \
            tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as err:
        saved = [os.dup(fd) for fd in (1, 2)]
        for fd, file in ((1, out), (2, err)):
            os.dup2(file.fileno(), fd)
        try:
            yield DescriptorCapture(out, err)
        finally:
            for fd, copy in zip((1, 2), saved, strict=True):
                os.dup2(copy, fd)
                os.close(copy)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The tiny 558k and 665k files (the mixture's bad images dropped, its text-only rows kept), converted as
    docs/llava-data.md says."""
    from llamafactory_hera.llava.data_convert import convert_file

    files = write_tree(tmp_path_factory.mktemp("llava_data"), REPO / "recipes" / "data" / "dataset_info.json",
                       captions=CAPTIONS)
    keep_loadable_rows(files.mixture)
    convert_file(files.mixture)
    return files


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def chain(request: pytest.FixtureRequest, assets: Any, tree: Any, tmp_path_factory: pytest.TempPathFactory) -> Chain:
    """compose, select (composed model and LLM alone), stage 1, stage 2, the twin of both and eval, for one family."""
    with descriptors_captured() as capfd:
        chain = run_chain(request.param, assets, tree, tmp_path_factory.mktemp(f"chain_{request.param}"), capfd)
    print(f"\ntiny LLaVA-1.5 chain, {chain.family}: " + ", ".join(f"{step} {s:.1f} s"
                                                               for step, s in chain.seconds.items()))
    return chain


def run_chain(family: str, assets: Any, tree: Any, root: Path, capfd: Any) -> Chain:
    """The chain's steps, each verb in this process."""
    llm_kind, vision_kind, stem = FAMILIES[family]
    flags, seconds = header_flags(stem), {}
    with timed(seconds, "compose"):
        llm, vision = build_part(llm_kind, root / llm_kind), build_part(vision_kind, root / vision_kind)
        composed = root / "composed"
        proc = run_verb(capfd, "compose", "--llm", llm, "--vision", vision, "--output", composed, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    template = proc.stdout.strip().splitlines()[-1].removeprefix("template: ")
    chain = Chain(family, root, llm, composed, template, seconds=seconds)

    # select as the header runs it (--dry-run: the recipe keeps its heads), on the composed model and on the LLM
    # alone (its family's text template)
    text_template = FAMILY_TEMPLATES[json.loads((composed / "llamafactory_hera_compose.json").read_text())[
        "family"]][1]
    for name, model, its_template in (("composed", composed, template), ("llm", llm, text_template)):
        path = root / f"select_{name}.yaml"
        path.write_text(yaml.safe_dump(tiny_recipe(stem, 1, tree, assets.teacher, model_name_or_path=model,
                                                   template=its_template, output_dir=root / "unused")))
        with timed(seconds, f"select ({name})"):
            proc = run_verb(capfd, "select", path, *flags["select"], cwd=root)
        assert proc.returncode == 0, proc.stderr[-3000:]
        chain.selection[name] = json.loads(record_paths(path)[0].read_text())
        if isinstance(yaml.safe_load(path.read_text()).get("hera_heads"), list):  # the paper's Table 5 heads
            assert "the recipe's hera_heads:" in proc.stdout and "not in this model" in proc.stdout, proc.stdout
    heads = chain.selection["composed"]["selected"]  # what `select --force` and the header's sed line would write

    # the two stages' recipes; `data check` of each, then stage 1, stage 2 and their twin (the header's overrides:
    # stage=sft, stage 2's twin from stage 1's)
    recipes = {number: tiny_recipe(stem, number, tree, assets.teacher, hera_heads=heads, model_name_or_path=composed,
                                   output_dir=root / "unused") for number in (1, 2)}
    for number, recipe in recipes.items():
        path = root / f"stage{number}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        with timed(seconds, "data check"):
            proc = run_verb(capfd, "data", "check", path, cwd=root)
        assert proc.returncode == 0, proc.stderr[-3000:]
        chain.data_checks[number] = proc.stdout
    for stage, tag, model in ((1, "hera", composed), (2, "hera", root / "stage1" / "hera"), (1, "sft", composed),
                              (2, "sft", root / "stage1" / "sft")):
        run = root / f"stage{stage}" / tag
        recipe = {**recipes[stage], "model_name_or_path": str(model), "output_dir": str(run),
                  **(flags["twin"] if tag == "sft" else {})}
        with timed(seconds, f"stage {stage}" if tag == "hera" else "twins"):
            run_train(recipe, root / f"work_{stage}_{tag}")
        chain.runs[f"stage{stage}/{tag}"] = run

    with timed(seconds, "eval"):
        proc = run_verb(capfd, "eval", chain.runs["stage2/hera"], "--baseline", chain.runs["stage2/sft"], "--tasks",
                        "demo", cwd=root)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    chain.eval_out = proc.stdout
    chain.eval_record = json.loads((chain.runs["stage2/hera"] / "eval_report_vs_sft.json").read_text())
    return chain


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    found: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        found.update(load_file(shard))
    return found


def changed(before: Path, after: Path) -> set[str]:
    old, new = weights(before), weights(after)
    assert old.keys() == new.keys()
    return {key for key in old if not torch.equal(old[key], new[key])}


def test_compose_prints_the_template_the_shipped_recipes_train_with(chain: Chain) -> None:
    stem = FAMILIES[chain.family][2]
    assert chain.template == shipped(stem, 1)["template"] == shipped(stem, 2)["template"]


def test_select_on_the_composed_model_is_select_on_the_llm_alone(chain: Chain) -> None:
    """Text mode: the captions go through the composed model's language model, which is the LLM; the same pairs,
    the same MKNN of every head (equal as floats) and so the same choice."""
    composed, llm = chain.selection["composed"], chain.selection["llm"]
    assert composed["num_pairs"] == llm["num_pairs"] == CAPTIONS
    assert composed["settings"]["mode"] == llm["settings"]["mode"] == "text"  # the recipes' hera_select_mode
    assert composed["identity"]["data_fingerprint"] == llm["identity"]["data_fingerprint"]
    assert torch.tensor(composed["scores"]).shape == (2, 4)  # the tiny LLMs' 2 layers x 4 heads
    assert composed["scores"] == llm["scores"]
    assert composed["selected"] == llm["selected"] and len({x for row in composed["scores"] for x in row}) > 1


def test_text_mode_pools_the_same_head_inputs_on_the_composed_model_and_the_llm(chain: Chain, tree: Any) -> None:
    """Below the scores (MKNN counts neighbours: a multiple of 1 / (pairs x k) here): every head's pooled o_proj
    input over the captions, as select collects it, is the same tensor on both models."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    from llamafactory_hera.hera.selection.collect import CalibrationPair, collect_text

    rows = json.loads((tree.pretrain / "blip_laion_cc_sbu_558k.json").read_text())
    pairs = [CalibrationPair(i, row["conversations"][1]["value"], (row["image"],)) for i, row in enumerate(rows)]
    pooled = [collect_text(loader.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder), pairs, 4,
                           "cpu", progress=False)
              for loader, folder in ((AutoModelForImageTextToText, chain.composed), (AutoModelForCausalLM, chain.llm))]
    assert len(pooled[0]) == len(pooled[1]) == 2 and pooled[0].keys() == pooled[1].keys()  # layer -> pooled
    assert all(torch.equal(pooled[0][layer], pooled[1][layer]) for layer in pooled[0])


def test_data_check_counts_both_stages_rows(chain: Chain) -> None:
    """Every caption has its image; the mixture's 6 rows, 2 of them text-only, 4 usable by HeRA."""
    for number, (dataset, rows, text_only) in {1: ("llava_pretrain_558k", CAPTIONS, 0),
                                               2: ("llava_v1_5_mix665k", 6, 2)}.items():
        row = next(line.split() for line in chain.data_checks[number].splitlines() if line.startswith(dataset))
        assert row[1:4] == [str(rows), "0", str(text_only)], chain.data_checks[number]
        assert row[-2:] == ["0", "0"]  # no image missing, none unreadable


def test_stage1_trains_the_projector_alone(chain: Chain) -> None:
    """freeze_language_model: the LLM and the vision tower are compose's output, bit for bit."""
    assert changed(chain.composed, chain.runs["stage1/hera"]) == {
        f"{PROJECTOR}linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}


def test_stage2_trains_the_llm_and_the_projector_from_stage1(chain: Chain) -> None:
    moved = changed(chain.runs["stage1/hera"], chain.runs["stage2/hera"])
    assert any(key.startswith(LANGUAGE) for key in moved)
    assert any(key.startswith(PROJECTOR) for key in moved)
    assert not any(key.startswith(VISION) for key in moved)  # freeze_vision_tower in both stages


def test_hera_term_is_logged_in_both_stages_and_text_only_rows_train(chain: Chain) -> None:
    """Both stages align select's heads with the shipped recipe's pooling (captions, then answers)."""
    for stage in (1, 2):
        settings = json.loads((chain.runs[f"stage{stage}/hera"] / "hera_run.json").read_text())
        assert settings["hera_heads"] == chain.selection["composed"]["selected"]
        assert settings["hera_pooling"] == shipped(FAMILIES[chain.family][2], stage)["hera_pooling"]
        lines = [line for line in read_trainer_log(chain.runs[f"stage{stage}/hera"]) if "loss" in line]
        assert len(lines) == TINY["max_steps"], stage
        assert all(line["hera_loss"] > 0 for line in lines), lines
        assert sum(line["hera_image_samples"] for line in lines) > 0
    stage2 = [line for line in read_trainer_log(chain.runs["stage2/hera"]) if "loss" in line]
    assert sum(line["hera_text_only_samples"] for line in stage2) > 0  # the mixture's text-only rows, no failure


def test_the_twins_train_without_the_hera_term(chain: Chain) -> None:
    for stage in (1, 2):
        assert not any(key.startswith("hera_") for line in read_trainer_log(chain.runs[f"stage{stage}/sft"])
                       for key in line)
    assert changed(chain.composed, chain.runs["stage1/sft"]) == changed(chain.composed, chain.runs["stage1/hera"])


def test_the_run_records_give_the_stage_chains(chain: Chain) -> None:
    run_chain = read_record(chain.runs["stage2/hera"] / RUN_RECORD)["chain"]
    twin_chain = read_record(chain.runs["stage2/sft"] / RUN_RECORD)["chain"]
    compose = {"compose": str(chain.composed.resolve()), "llm": str(chain.llm),
               "vision": str(chain.root / FAMILIES[chain.family][1])}
    assert run_chain == [compose, *({"stage": "hera", "output_dir": str(chain.runs[f"stage{s}/hera"].resolve())}
                                    for s in (1, 2))]
    assert twin_chain == [compose, *({"stage": "sft", "output_dir": str(chain.runs[f"stage{s}/sft"].resolve())}
                                     for s in (1, 2))]
    assert chain_words(run_chain, numbered=True) == "HeRA stage 1 -> HeRA stage 2"
    assert chain_words(twin_chain, numbered=False) == "SFT -> SFT"


def test_eval_scores_stage2_against_the_twin_on_the_demo(chain: Chain) -> None:
    """The demo tasks are none of Table 2's groups: the report has no Table 2 layout (no group means to take)."""
    record = chain.eval_record
    assert record["run"]["stage"] == "hera" and record["baseline"]["trained"]
    assert {row["task"] for row in record["rows"]} == {"llamafactory_hera_demo_mllm"}
    assert all(row["run"] is not None and row["baseline"] is not None for row in record["rows"])
    assert record["table2"] is None and "Table 2 layout" not in chain.eval_out


def test_table2_titles_the_demo_eval_with_both_chains(chain: Chain) -> None:
    """Fed the demo eval's record with a task of the General group planned but unscored (as a benchmark that cannot
    run offline): the title names both chains from the run records, every group mean is missing, none invented."""
    record = {**chain.eval_record, "rows": [*chain.eval_record["rows"],
                                            {"task": "gqa", "metric": "exact_match", "run": None, "baseline": None}]}
    layout = table2(record)
    llm_kind, vision_kind, _ = FAMILIES[chain.family]
    assert layout["title"] == f"{llm_kind} + {vision_kind}, HeRA stage 1 -> HeRA stage 2 vs SFT -> SFT"
    assert layout["delta_vision"] is None and layout["paper"] is None  # the tiny LLMs are no backbone of Table 2
    assert all(group["mean"] is None for group in layout["run"].values())
    lines = markdown_lines(layout, record["run"]["title"], record["baseline"]["title"])
    assert lines[0] == f"Table 2 layout: {layout['title']}"
    assert "- run General: no mean, missing mme, mmbench_en_dev_static, seedbench, gqa" in lines


def test_stage2_resumed_from_its_checkpoint_ends_as_the_run_not_stopped(chain: Chain, assets: Any, tree: Any) -> None:
    """The composed model saves as ``language_model.*`` / ``multi_modal_projector.*`` (LLaVA's original format) what
    it holds as ``model.language_model.*``: the resumed stage 2 restores every weight (the Trainer's own resume
    restored none) and ends bit-identical to the run not stopped: weights, optimizer, temperature."""
    stem = FAMILIES[chain.family][2]
    root = chain.root / "resume"
    recipe = tiny_recipe(stem, 2, tree, assets.teacher, hera_heads=chain.selection["composed"]["selected"],
                         model_name_or_path=chain.runs["stage1/hera"], save_steps=1)
    whole, resumed = root / "whole", root / "resumed"
    run_train({**recipe, "output_dir": str(whole)}, root / "work_whole")
    assert any(key.startswith(LANGUAGE) for key in weights(whole / "checkpoint-1"))
    proc = run_train({**recipe, "output_dir": str(resumed), "resume_from_checkpoint": str(whole / "checkpoint-1")},
                     root / "work_resumed")
    assert "missing keys" not in proc.stdout + proc.stderr
    assert assert_resumed_equals_whole(whole, resumed, 2) == ["model", "optimizer.pt", "hera_state.json"]


def test_the_same_stage1_command_again_is_refused_not_resumed(chain: Chain, assets: Any, tree: Any) -> None:
    """As the recipes' headers say: a finished stage's folder is refused (before: resumed from its last checkpoint and
    its model, stage 2's start, overwritten), naming the folder and the two ways on."""
    stem, run = FAMILIES[chain.family][2], chain.runs["stage1/hera"]
    recipe = tiny_recipe(stem, 1, tree, assets.teacher, hera_heads=chain.selection["composed"]["selected"],
                         model_name_or_path=chain.composed, output_dir=run)
    saved = weights(run)
    proc = run_train(recipe, chain.root / "work_again", check=False)
    assert proc.returncode == 1
    assert f"[llamafactory-hera] error: output_dir: {run} holds a finished run" in proc.stderr
    assert "Set another output_dir" in proc.stderr and "overwrite_output_dir: true" in proc.stderr
    assert all(torch.equal(saved[key], value) for key, value in weights(run).items())
