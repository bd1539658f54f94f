"""What plan needs of a model family, from its config alone."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from llamafactory_hera.llava.compose_plan import DEFAULT_VISION, ENCODER_OF_TYPE, ENCODERS, FEATURE_LAYER

PROJECTOR = ("merger", "multi_modal_projector")
VISION = ("visual", "vision_tower", "image_newline")
TOWER_MERGERS = "deepstack_merger"  # Qwen3-VL's: in LLaMA-Factory's vision_model_keys, frozen with the tower
TOKEN_TYPES = {"qwen3_vl": "mm_token_type_ids", "qwen3_5": "mm_token_type_ids", "gemma3": "token_type_ids"}


def part(name: str) -> str:
    """``name``'s part: ``projector``, ``vision`` or ``language``."""
    return (
        "projector"
        if any(k in name for k in PROJECTOR) and TOWER_MERGERS not in name
        else "vision"
        if any(k in name for k in VISION)
        else "language"
    )


@dataclass(frozen=True)
class Images:
    """One row's image: tokens, ``pixel_values`` shape (rows' joined on the first axis), integer inputs."""

    tokens: int
    pixels: tuple[int, ...]
    inputs: dict[str, list[int]]


def grid_side(config: Any, max_pixels: int) -> int:
    """Qwen-VL: patches per side of the largest square of ``max_pixels`` the processor keeps (merged patches whole)."""
    vision = config.vision_config
    unit = vision.patch_size * vision.spatial_merge_size
    return max(1, math.isqrt(max_pixels) // unit) * vision.spatial_merge_size


def images(config: Any, max_pixels: int) -> Images | None:
    """A square image of ``max_pixels`` as the family's processor gives it; None: a text model."""
    vision = getattr(config, "vision_config", None)
    if vision is None:
        return None
    side = math.isqrt(max_pixels)
    if hasattr(vision, "spatial_merge_size"):  # Qwen-VL, Qwen3.5: a grid of patches, merged 2 x 2
        grid = grid_side(config, max_pixels)
        return Images(
            grid * grid // vision.spatial_merge_size**2,
            (grid * grid, 3 * vision.temporal_patch_size * vision.patch_size**2),
            {"image_grid_thw": [1, grid, grid]},
        )
    size, patch = (value if isinstance(value, int) else value[0] for value in (vision.image_size, vision.patch_size))
    if config.model_type == "llava_next":  # anyres: best tile grid + base image, LlavaNextProcessor's count
        # lazy: transformers' LLaVA-NeXT processing, for this family only
        from transformers import LlavaNextProcessor
        from transformers.image_processing_utils import select_best_resolution

        height, width = select_best_resolution([side, side], config.image_grid_pinpoints)
        this = SimpleNamespace(
            image_processor=SimpleNamespace(image_grid_pinpoints=config.image_grid_pinpoints),
            patch_size=patch,
            num_additional_image_tokens=1,
            _get_unpadded_features=lambda *a: LlavaNextProcessor._get_unpadded_features(None, *a),
        )
        tokens = LlavaNextProcessor._get_number_of_features(this, side, side, size, size)
        return Images(
            tokens - (config.vision_feature_select_strategy == "default"),
            (1, height // size * (width // size) + 1, 3, size, size),
            {"image_sizes": [side, side]},
        )
    if config.model_type == "internvl":  # one tile: LLaMA-Factory's crop_to_patches: false (tiling not counted)
        return Images(int((size // patch) ** 2 * config.downsample_ratio**2), (1, 3, size, size), {})
    tokens = getattr(config, "mm_tokens_per_image", None) or config.image_seq_length  # Gemma 3, LLaVA: fixed size
    return Images(tokens, (1, 3, size, size), {})


COMPOSE_LINE = re.compile(r"llamafactory-hera compose --llm (\S+)(?: --vision (\S+))? --output \S+")


def composed_config(recipe_text: str) -> Any | None:
    """The config the compose command in the recipe's header builds; None: no such command."""
    from transformers import AutoConfig, LlavaConfig  # lazy: transformers only once a recipe is read

    if (found := COMPOSE_LINE.search(recipe_text)) is None:
        return None
    text = AutoConfig.from_pretrained(found[1], local_files_only=True)
    tower = AutoConfig.from_pretrained(found[2] or DEFAULT_VISION, local_files_only=True)
    tower = getattr(tower, "vision_config", None) or tower
    cls, strategy = ENCODERS[ENCODER_OF_TYPE[tower.model_type]]
    return LlavaConfig(
        text_config=text,
        vision_config=tower,
        image_token_index=text.vocab_size - 1,  # any id
        image_seq_length=(tower.image_size // tower.patch_size) ** 2 + cls - (strategy == "default"),
        vision_feature_select_strategy=strategy,
        vision_feature_layer=FEATURE_LAYER,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(text.tie_word_embeddings),
    )
