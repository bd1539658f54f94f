"""Build and write ``LlavaForConditionalGeneration`` (docs/hera.md, "Compose a LLaVA-1.5 model from an LLM"), in a
temporary sibling folder moved to ``--output`` at the end."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)
from transformers.models.auto.modeling_auto import MODEL_MAPPING
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector
from transformers.utils import logging

from llamafactory_hera.llava.compose_plan import ComposePlan
from llamafactory_hera.runtime.run_record import (
    COMPOSE_RECORD as RECORD,  # a run's record reads it back (its chain)
)
from llamafactory_hera_patches.data.llava_templates import IMAGE_TOKEN
from llamafactory_hera_patches.stacks import dtype_key


def add_image_token(tokenizer: Any, llm: Any) -> str:
    """Add ``<image>`` with an embedding row in ``llm``; what was done, in words."""
    if IMAGE_TOKEN in tokenizer.get_vocab():
        return f"{IMAGE_TOKEN} already in the LLM's tokenizer (id {tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)}): kept"
    known = len(tokenizer)
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    rows = llm.get_input_embeddings().weight.shape[0]
    grown = token_id >= rows
    if grown:
        llm.resize_token_embeddings(token_id + 1, mean_resizing=False)
    inputs = llm.get_input_embeddings().weight
    outputs = llm.get_output_embeddings().weight
    tied = outputs is inputs
    mean_of = min(known, rows)
    with torch.no_grad():
        for matrix in (inputs,) if tied else (inputs, outputs):
            matrix[token_id] = matrix[:mean_of].float().mean(0).to(matrix.dtype)
    where = "a new row" if grown else f"row {token_id} of {rows} (unused by the tokenizer)"
    sides = "input embedding (tied with the output)" if tied else "input and output embeddings"
    return (
        f"{IMAGE_TOKEN} added as token {token_id}: {where} of the {sides} set to the mean of the {mean_of} rows of "
        "the tokens the LLM's tokenizer had"
    )


def _vision_tower(name: str) -> Any:
    config = AutoConfig.from_pretrained(name)
    vision_config = getattr(config, "vision_config", None) or config
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the text tower is left out on purpose
    try:
        tower, info = MODEL_MAPPING[type(vision_config)].from_pretrained(
            name, config=vision_config, **{dtype_key(): "auto"}, output_loading_info=True
        )
    finally:
        logging.set_verbosity(verbosity)
    if info["missing_keys"]:
        raise ValueError(
            f"--vision {name}: its weights hold no vision tower ({', '.join(sorted(info['missing_keys'])[:3])}, ...)"
        )
    if getattr(tower, "use_head", False):  # LLaVA reads patch tokens only (as LLaVA-OneVision)
        tower.use_head = tower.config.vision_use_head = False
        del tower.head
    return tower


def _llava_model(plan: ComposePlan, llm: Any, tower: Any, token_id: int) -> Any:
    geometry = plan.geometry
    config = LlavaConfig(
        text_config=llm.config,
        vision_config=tower.config,
        image_token_index=token_id,
        image_seq_length=geometry.image_seq_length,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        vision_feature_layer=geometry.feature_layer,
        vision_feature_select_strategy=geometry.select_strategy,
        tie_word_embeddings=bool(llm.config.tie_word_embeddings),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(plan.seed)
        projector = LlavaMultiModalProjector(config).to(llm.dtype)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = tower.to(llm.dtype)
    model.model.multi_modal_projector = projector
    model.model.language_model = getattr(llm, llm.base_model_prefix)
    model.lm_head = llm.get_output_embeddings()
    model.generation_config = llm.generation_config
    model.config.dtype = llm.dtype
    left = [name for name, tensor in (*model.named_parameters(), *model.named_buffers()) if tensor.is_meta]
    if left:
        raise RuntimeError(f"llamafactory-hera compose: LLaVA model tensors not filled from the parts: {left[:3]}")
    return model


def _processor(plan: ComposePlan, tokenizer: Any) -> Any:
    geometry = plan.geometry
    return LlavaProcessor(
        image_processor=AutoImageProcessor.from_pretrained(plan.vision),
        tokenizer=tokenizer,
        patch_size=geometry.patch_size,
        vision_feature_select_strategy=geometry.select_strategy,
        num_additional_image_tokens=geometry.cls_tokens,
        image_token=IMAGE_TOKEN,
    )


def compose(plan: ComposePlan, tokenizer: Any) -> dict[str, Any]:
    llm = AutoModelForCausalLM.from_pretrained(plan.llm, **{dtype_key(): "auto"})
    tower = _vision_tower(plan.vision)
    dtype, vision_dtype = (str(module.dtype).removeprefix("torch.") for module in (llm, tower))
    token_words = add_image_token(tokenizer, llm)
    model = _llava_model(plan, llm, tower, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    geometry = plan.geometry
    projector = model.model.multi_modal_projector
    record = {
        "llm": plan.llm,
        "vision": plan.vision,
        "family": plan.family,
        "family_from": plan.family_reason,
        "template": plan.template,
        "architecture": "LlavaForConditionalGeneration",
        "vision_encoder": geometry.encoder,
        "vision_left_out": "SigLIP's attention-pooling head (never read)" if geometry.encoder == "siglip" else "none",
        "vision_feature_layer": geometry.feature_layer,
        "vision_feature_select_strategy": geometry.select_strategy,
        "image_size": geometry.image_size,
        "patch_size": geometry.patch_size,
        "image_seq_length": geometry.image_seq_length,
        "image_token": IMAGE_TOKEN,
        "image_token_id": model.config.image_token_index,
        "added_token": token_words,
        "projector": (
            f"mlp2x_gelu: Linear({projector.linear_1.in_features}, {projector.linear_1.out_features}), GELU, "
            f"Linear({projector.linear_2.in_features}, {projector.linear_2.out_features}), with biases"
        ),
        "projector_init": "PyTorch nn.Linear default (Kaiming-uniform weights, uniform biases), as LLaVA-1.5's",
        "seed": plan.seed,
        "dtype": dtype,
        "vision_dtype": vision_dtype if vision_dtype == dtype else f"{vision_dtype}, cast to the LLM's {dtype}",
    }
    output = plan.output.resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.composing-", dir=output.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # not mkdtemp's 0700
    try:
        model.save_pretrained(staging)
        _processor(plan, tokenizer).save_pretrained(staging)
        (staging / RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        os.replace(staging, output)  # onto a missing or empty folder
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return record
