"""The one-GPU recipes and the methods' docs say how to pin one GPU (``llamafactory-cli
train`` starts a process on every visible GPU: a one-GPU HeRA recipe on an 8-GPU node trains on 8x the samples per
step at the same learning rate, HARC on 8x the rows with the same schedule, RAH-LoRA refuses), and the docs say that
FSDP is refused and DeepSpeed ZeRO is the supported sharding."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import REPO
from markdown_docs import read

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
MULTI_GPU = ("_full", "_fsdp2")  # ZeRO-3 full fine-tunes under torchrun, LoRA under accelerate's FSDP2
EIGHT_GPU = [p for p in RECIPES if p.stem.endswith(MULTI_GPU)] + sorted((REPO / "recipes" / "llava15").glob("*.yaml"))
PIN = "CUDA_VISIBLE_DEVICES=0 llamafactory-cli train"


def _header(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return lines[:next(i for i, line in enumerate(lines) if not line.startswith("#"))]


@pytest.mark.parametrize("path", [p for p in RECIPES if not p.stem.endswith(MULTI_GPU)], ids=lambda p: p.name)
def test_a_one_gpu_recipe_header_pins_one_gpu(path: Path) -> None:
    header = _header(path)
    assert any(line.startswith("# One GPU: llamafactory-cli starts a process on every visible GPU") for line in header)
    runs = [line for line in header if f"llamafactory-cli train recipes/{path.name}" in line]
    assert runs and all(PIN in line for line in runs), runs


@pytest.mark.parametrize("path", EIGHT_GPU, ids=lambda p: p.name)  # recipes/llava15/: the paper's 8-GPU stages
def test_an_eight_gpu_recipe_header_does_not_pin(path: Path) -> None:
    header = "\n".join(_header(path))
    assert "8 GPUs" in header and "CUDA_VISIBLE_DEVICES" not in header


@pytest.mark.parametrize("doc", ["docs/hera.md", "docs/rah.md", "docs/harc.md"])
def test_method_docs_pin_one_gpu_and_say_which_fsdp_runs(doc: str) -> None:
    """RAH-LoRA refuses FSDP; HeRA and HARC run FSDP2 from accelerate launch with a full state dict and refuse the
    rest (recipe/fsdp.py)."""
    text = read(doc)
    assert any(line.startswith(f"{PIN} recipes/") for line in text.splitlines()), doc  # in a command block
    prose = " ".join(text.split())
    if doc == "docs/rah.md":  # RAH-LoRA runs on one process, DeepSpeed refused too
        assert re.search(r"FSDP[^.]*(refused|`fsdp`, `fsdp_config`)", prose), doc
        assert "accelerate launch` with an FSDP config" in prose, doc
        return
    assert "accelerate launch --config_file fsdp2_config.yaml src/train.py recipe.yaml` with `fsdp_version: 2` and " \
        "`fsdp_state_dict_type: FULL_STATE_DICT`" in prose, doc
    assert "FSDP1" in prose and "`SHARDED_STATE_DICT`" in prose and "accelerate PR 4206" in prose, doc
