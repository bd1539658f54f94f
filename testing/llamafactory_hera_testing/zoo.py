"""Every image-text family LLaMA-Factory 0.9.5 ships with a transformers 5.6 class, as a tiny random-weight model (tests
only): the fixtures' three (:mod:`llamafactory_hera.fixtures.models`), the recipe families
(:mod:`llamafactory_hera_testing.families`) and the rest (:mod:`.zoo_gemma`, :mod:`.zoo_llama_mistral_lfm`,
:mod:`.zoo_qwen_video_llava`, :mod:`.zoo_glm_ernie`).

:func:`zoo_model` builds a family once under a root folder (built in a temporary sibling and renamed into place, so
pytest-xdist workers building at once never read a partial build); the tests' root is conftest's ``zoo`` fixture's,
kept under .hera_assets/ across runs.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from transformers import PreTrainedModel, ProcessorMixin

from llamafactory_hera.fixtures.models import save_built
from llamafactory_hera_testing.zoo_gemma import ZOO_GEMMA
from llamafactory_hera_testing.zoo_glm_ernie import ZOO_GLM_ERNIE
from llamafactory_hera_testing.zoo_llama_mistral_lfm import ZOO_LLAMA_MISTRAL_LFM
from llamafactory_hera_testing.zoo_qwen_video_llava import ZOO_QWEN_VIDEO_LLAVA

Builder = Callable[[], tuple[PreTrainedModel, ProcessorMixin]]

# family -> (LLaMA-Factory template, builder), the families beyond the fixtures' and the recipes'
ZOO: dict[str, tuple[str, Builder]] = {**ZOO_GEMMA, **ZOO_LLAMA_MISTRAL_LFM, **ZOO_QWEN_VIDEO_LLAVA, **ZOO_GLM_ERNIE}
STREAM = 300  # RNG streams of these builds: after the fixtures' and families.py's
VERSION = 1  # bump whenever a builder changes

# families that need the model's own code from the Hub (trust_remote_code): no transformers 5.6 class to build
REMOTE_CODE_ONLY = ("minicpm_v", "minicpm_o", "kimi_vl", "intern_s1", "keye_vl", "dots_ocr", "youtu_vl")


def zoo_model(name: str, root: str | Path, seed: int = 0) -> Path:
    """The folder of family ``name``'s tiny model (model, tokenizer, processor) under ``root``, built if missing."""
    folder = Path(root).resolve() / f"{name}-v{VERSION}-s{seed}"
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        save_built(ZOO[name][1], tmp / "model", seed, STREAM + list(ZOO).index(name))
        try:
            os.replace(tmp / "model", folder)
        except OSError:
            if not (folder / "config.json").is_file():  # else a concurrent builder finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
