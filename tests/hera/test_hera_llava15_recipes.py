"""The paper's experiment (Table 2) as recipes: recipes/llava15/<stem>_stage1.yaml and _stage2.yaml for each LLM.

- Every recipe goes through LLaMA-Factory's own reader and parser with the plugin's split of the ``hera_*`` keys.
- The two stages are LLaVA-1.5's on one 8-GPU node: global batches 256 / 128, learning rates 1e-3 / 2e-5, the
  projector alone then LLM + projector, the datasets and ``media_dir`` docs/llava-data.md gives, HeRA's pooling of
  each stage, the template compose prints for the LLM's family (its map, imported), stage 2 starting from stage 1's
  ``output_dir`` and stage 1 from compose's ``--output``.
- Every recipe fits an 80 GB GPU by one rule: LLaVA-1.5's per-device batch 16 where recipes/memory.py's estimate stays
  under its ``FIT_GIB``, else 8 with twice the accumulation; HeRA's contrastive set per micro-step, per-device x 8
  GPUs under ``hera_gather``, holds at least ``hera_k + 1`` samples.
- The header's commands are the whole chain with the right files and folders, and its memory figure is
  recipes/memory.py's; docs/hera.md's table is too. No model is loaded.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_hera_recipes import MEMORY, PAPER_DEFAULTS, _check_comments

from conftest import REPO
from llamafactory_hera.evaluation.presets import PRESETS
from llamafactory_hera_patches.data.llava_templates import FAMILY_TEMPLATES

BACKBONES = MEMORY.BACKBONES
RECIPE_NAMES = [name for b in BACKBONES for name in MEMORY.llava15_recipes(b)]
GLOBAL_BATCH = {1: 256, 2: 128}  # LLaVA-1.5
LEARNING_RATE = {1: 1e-3, 2: 2e-5}
POOLING = {1: "assistant", 2: "assistant"}  # stage 1 pools the captions (each row's answer), stage 2 the answers
DATASET = {1: "llava_pretrain_558k", 2: "llava_v1_5_mix665k"}
TASKS = "general,knowledge,ocr,vision-centric"
SECTION = "The paper's experiment (Table 2): LLaVA-1.5 from an LLM"


def _recipe(name: str) -> dict[str, Any]:
    return yaml.safe_load((REPO / "recipes" / name).read_text(encoding="utf-8"))


def _estimate_gib(backbone: Any, name: str, per_device: int) -> float:
    """recipes/memory.py's estimate for recipe ``name`` with ``per_device_train_batch_size`` set to ``per_device``."""
    recipe = {**_recipe(name), "per_device_train_batch_size": per_device}
    return MEMORY.estimate_gib(MEMORY.composed(backbone), recipe, zero=3)


def _header_commands(name: str) -> list[list[str]]:
    """The commands of a recipe's header comment (its ``#   llamafactory-`` and ``#   sed`` lines), split as a shell
    would."""
    lines = (REPO / "recipes" / name).read_text(encoding="utf-8").splitlines()
    header = lines[:next(i for i, line in enumerate(lines) if not line.startswith("#"))]
    starts = ("#   llamafactory-", "#   sed ")
    return [shlex.split(line[4:]) for line in header if line.startswith(starts)]


def _media_dir_documented(dataset: str) -> str:
    """The ``media_dir`` docs/llava-data.md's table gives for a dataset_info.json entry."""
    text = (REPO / "docs" / "llava-data.md").read_text(encoding="utf-8")
    return re.search(rf"^\| `{dataset}` \| `[^`]+` \| `([^`]+)` \|$", text, flags=re.M).group(1)


def test_every_table2_llm_has_both_stages_and_nothing_else_is_there() -> None:
    assert sorted(p.name for p in (REPO / "recipes" / MEMORY.LLAVA15).iterdir()) == \
        sorted(Path(name).name for name in RECIPE_NAMES)
    assert len(BACKBONES) == 9 and all(b.llm_id and b.llm_family for b in BACKBONES)


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_recipe_parses_with_llamafactory_and_the_plugin(name: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """As `llamafactory-cli train recipes/llava15/<name>` reads it; DeepSpeed dropped and the CPU used (no GPU here)."""
    from llamafactory.hparams import get_train_args, read_args

    from llamafactory_hera.hera.config import parse_hera_arguments
    from llamafactory_hera_patches.recipe.arguments import split_args

    monkeypatch.setattr(sys, "argv", ["llamafactory-cli", str(REPO / "recipes" / name),
                                      f"output_dir={tmp_path / 'out'}"])
    host, hera_raw, is_hera = split_args(read_args())
    assert is_hera and host["stage"] == "sft"
    hera = parse_hera_arguments(hera_raw)
    host.pop("deepspeed")
    host["use_cpu"] = True
    model_args, data_args, training_args, finetuning_args, _ = get_train_args(host)
    recipe = _recipe(name)
    assert model_args.model_name_or_path == recipe["model_name_or_path"] and data_args.template == recipe["template"]
    assert data_args.media_dir == recipe["media_dir"] and data_args.cutoff_len == 2048
    assert finetuning_args.finetuning_type == "full" and finetuning_args.freeze_vision_tower
    assert training_args.bf16 and hera.hera_gather  # the contrastive set per micro-step: per device x 8 GPUs
    assert training_args.per_device_train_batch_size * MEMORY.NUM_GPUS >= hera.hera_k + 1
    assert hera.hera_pooling == recipe["hera_pooling"]


@pytest.mark.parametrize("backbone", BACKBONES, ids=lambda b: b.stem)
def test_the_two_stages_are_llava15s(backbone: Any) -> None:
    stage1, stage2 = (_recipe(name) for name in MEMORY.llava15_recipes(backbone))
    saves = f"saves/llava15/{backbone.stem}"
    assert stage1["model_name_or_path"] == f"{saves}/composed"
    assert stage2["model_name_or_path"] == stage1["output_dir"] == f"{saves}/stage1/hera"
    assert stage2["output_dir"] == f"{saves}/stage2/hera"
    assert stage1["freeze_language_model"] is True and stage2["freeze_language_model"] is False
    for stage, recipe in ((1, stage1), (2, stage2)):
        batch = recipe["per_device_train_batch_size"] * recipe["gradient_accumulation_steps"] * MEMORY.NUM_GPUS
        assert batch == GLOBAL_BATCH[stage] and recipe["learning_rate"] == LEARNING_RATE[stage]
        assert recipe["hera_pooling"] == POOLING[stage] and not recipe.get("train_on_prompt")
        assert recipe["dataset"] == DATASET[stage] and recipe["dataset_dir"] == "recipes/data"
        assert recipe["media_dir"] == _media_dir_documented(DATASET[stage])
        assert recipe["template"] == FAMILY_TEMPLATES[backbone.llm_family][0]  # what compose prints
        assert recipe["finetuning_type"] == "full" and recipe["deepspeed"] == "recipes/deepspeed/ds_z3_config.json"
        assert recipe["freeze_vision_tower"] is True and recipe["freeze_multi_modal_projector"] is False
        schedule = recipe["num_train_epochs"], recipe["warmup_ratio"], recipe["lr_scheduler_type"]
        assert schedule == (1.0, 0.03, "cosine")
        assert recipe["bf16"] is True and recipe["cutoff_len"] == 2048 and recipe["stage"] == "hera"
        assert recipe.get("disable_gradient_checkpointing") is False
        for key, value in PAPER_DEFAULTS.items():
            if key != "hera_heads":
                assert recipe[key] == value, f"stage {stage}: {key}"
    # the same heads in both stages: the paper's Table 5 where we have them, else auto until `select` writes them
    expected = list(backbone.paper_heads) if backbone.paper_heads else "auto"
    assert stage1["hera_heads"] == stage2["hera_heads"] == expected


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_per_device_batch_is_llava15s_16_unless_that_does_not_fit(name: str) -> None:
    backbone = next(b for b in BACKBONES if name in MEMORY.llava15_recipes(b))
    fits_16 = _estimate_gib(backbone, name, 16) <= MEMORY.FIT_GIB
    assert _recipe(name)["per_device_train_batch_size"] == (16 if fits_16 else 8)
    assert MEMORY.llava15_gib(backbone, name) <= MEMORY.FIT_GIB < MEMORY.GPU_GIB


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_header_gives_the_whole_chain_and_the_memory(name: str) -> None:
    backbone = next(b for b in BACKBONES if name in MEMORY.llava15_recipes(b))
    s1, s2 = (f"recipes/{n}" for n in MEMORY.llava15_recipes(backbone))
    stage1, stage2 = _recipe(s1[len("recipes/"):]), _recipe(s2[len("recipes/"):])
    twin1, twin2 = (folder.replace("/hera", "/sft") for folder in (stage1["output_dir"], stage2["output_dir"]))
    if backbone.paper_heads:  # the recipes hold the paper's heads: select scores and reports, writes nothing
        select = [["llamafactory-hera", "select", s1, "--dry-run"]]
    else:  # select writes the heads into stage 1's recipe; the same line goes into stage 2's
        select = [["llamafactory-hera", "select", s1],
                  ["sed", "-i", f"s/^hera_heads:.*/$(grep -o '^hera_heads: [^#]*' {s1})/", s2]]
    assert _header_commands(name) == [
        ["llamafactory-hera", "compose", "--llm", backbone.llm_id, "--output", stage1["model_name_or_path"]],
        *select,
        ["llamafactory-hera", "data", "check", s1],
        ["llamafactory-hera", "data", "check", s2],
        ["llamafactory-cli", "train", s1],
        ["llamafactory-cli", "train", s2],
        ["llamafactory-cli", "train", s1, "stage=sft", f"output_dir={twin1}"],
        ["llamafactory-cli", "train", s2, "stage=sft", f"model_name_or_path={twin1}", f"output_dir={twin2}"],
        ["llamafactory-hera", "eval", stage2["output_dir"], "--baseline", twin2, "--tasks", TASKS],
    ]
    assert set(TASKS.split(",")) <= set(PRESETS)
    text = (REPO / "recipes" / name).read_text(encoding="utf-8")
    gib = MEMORY.llava15_gib(backbone, name)
    assert f"# GPU memory, estimated (recipes/memory.py): ~{gib:.0f} GiB per GPU" in text
    assert ("exceeds 80 GB" in text) == (gib > MEMORY.GPU_GIB)
    if _recipe(name)["per_device_train_batch_size"] != 16:  # the header says why: LLaVA-1.5's 16, its estimate
        assert f"LLaVA-1.5's 16 would need ~{_estimate_gib(backbone, name, 16):.0f} GiB" in text
    _check_comments(name, text)
    if backbone.paper_heads:
        heads = f"[{', '.join(backbone.paper_heads)}]"
        assert f"Paper, Table 5: the 5 least aligned heads of the text-only {backbone.llm} are {heads}" in text
    else:
        assert f"the heads selected for {backbone.llm} are not reproduced in our sources" in text


def test_composed_model_memory_counts_the_llm_the_vision_tower_and_the_projector() -> None:
    qwen3_8b = next(b for b in BACKBONES if b.stem == "qwen3_8b")
    composed = MEMORY.composed(qwen3_8b)
    projector = 1152 * 4096 + 4096 + 4096 * 4096 + 4096
    assert composed.projector_b * 1e9 == pytest.approx(projector)
    assert composed.params_b * 1e9 == pytest.approx(8.19e9 + 0.4e9 + projector)
    stage1, stage2 = (_estimate_gib(qwen3_8b, name, 16) for name in MEMORY.llava15_recipes(qwen3_8b))
    assert stage1 < stage2  # at the same micro-batch: the frozen LLM keeps no gradient or Adam state


def test_docs_section_gives_the_chain_and_the_table() -> None:
    """docs/hera.md's section has the recipes' table and, under "Reproduce Table 2", the chain a header gives."""
    text = (REPO / "docs" / "hera.md").read_text(encoding="utf-8")
    headings = re.findall(r"^## (.+)$", text, flags=re.M)
    assert headings.index(SECTION) == headings.index("Compose a LLaVA-1.5 model from an LLM") + 1
    section = re.search(rf"^## {re.escape(SECTION)}$(.*?)(?=^## |\Z)", text, flags=re.M | re.S).group(1)
    for row in MEMORY.llava15_rows():
        assert row in section, f"docs/hera.md table row differs from `python recipes/memory.py`:\n{row}"
    assert re.findall(r"^### (.+)$", section, flags=re.M) == ["Reproduce Table 2"]  # the "Done when"
    reproduce = section.split("### Reproduce Table 2", 1)[1]
    commands = [shlex.split(line) for line in reproduce.splitlines() if line.startswith(("llamafactory-", "sed "))]
    assert commands == _header_commands("llava15/qwen3_4b_stage1.yaml")  # the chain the recipes' headers give


def test_the_headers_sed_line_copies_the_heads_select_writes_into_stage2(tmp_path: Path) -> None:
    """The chain's copy step, run as the header writes it (bash, sed, grep) on copies of the two recipes."""
    from llamafactory_hera.hera.selection.recipe_write import update_recipe

    backbone = next(b for b in BACKBONES if not b.paper_heads)
    names = MEMORY.llava15_recipes(backbone)
    for name in names:
        (tmp_path / "recipes" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / "recipes" / name, tmp_path / "recipes" / name)
    heads = ["L13H12", "L7H6", "L3H5", "L13H13", "L1H0"]
    update_recipe(tmp_path / "recipes" / names[0], heads)  # what `llamafactory-hera select` writes
    lines = (REPO / "recipes" / names[0]).read_text(encoding="utf-8").splitlines()
    sed = next(line[4:] for line in lines if line.startswith("#   sed "))
    subprocess.run(["bash", "-c", sed], cwd=tmp_path, check=True)
    stage1, stage2 = (yaml.safe_load((tmp_path / "recipes" / name).read_text(encoding="utf-8")) for name in names)
    assert stage1["hera_heads"] == stage2["hera_heads"] == heads
    assert {**stage2, "hera_heads": "auto"} == _recipe(names[1])  # nothing else of stage 2 changed
