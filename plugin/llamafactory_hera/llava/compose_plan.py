"""What ``compose`` will build, from the parts' configs and the LLM's tokenizer (no weights), and its refusals."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamafactory_hera.recipe.parsed_checks import check_output_dir
from llamafactory_hera.runtime.errors import RecipeError
from llamafactory_hera_patches.data.llava_templates import FAMILY_TEMPLATES

DEFAULT_VISION = "google/siglip2-so400m-patch14-384"
FEATURE_LAYER = -2
# encoder family -> ([CLS] tokens it adds, LLaVA's feature selection)
ENCODERS: dict[str, tuple[int, str]] = {"clip": (1, "default"), "siglip": (0, "full")}
ENCODER_OF_TYPE = {"clip": "clip", "clip_vision_model": "clip", "siglip": "siglip", "siglip_vision_model": "siglip"}
_FAMILY_OF_TYPE = {"qwen2": "qwen2.5", "qwen3": "qwen3"}  # llama: by its tokenizer
# config keys of a model that already sees media
_MULTIMODAL_KEYS = (
    "vision_config",
    "text_config",
    "audio_config",
    "vision_tower",
    "mm_vision_tower",
    "visual",
    "image_token_index",
    "image_token_id",
)


@dataclass(frozen=True)
class VisionGeometry:
    encoder: str  # "clip" | "siglip"
    image_size: int
    patch_size: int
    cls_tokens: int  # [CLS] tokens before the patches
    select_strategy: str  # "default": drop the [CLS]; "full": every token
    feature_layer: int = FEATURE_LAYER

    @property
    def image_seq_length(self) -> int:
        kept_cls = self.cls_tokens - (1 if self.select_strategy == "default" else 0)
        return (self.image_size // self.patch_size) ** 2 + kept_cls


@dataclass(frozen=True)
class ComposePlan:
    llm: str
    vision: str
    output: Path
    family: str
    family_reason: str  # how the family was found
    template: str
    geometry: VisionGeometry
    seed: int


def _config_dict(name: str, flag: str) -> dict[str, Any]:
    from transformers import PretrainedConfig  # lazy: seconds of import

    try:
        config, _ = PretrainedConfig.get_config_dict(name)
    except (OSError, ValueError) as err:
        raise RecipeError(
            f"{flag} {name}: its config.json cannot be read ({str(err).splitlines()[0]}); give a Hub id "
            "or a local folder holding a Hugging Face model."
        ) from err
    return config


def check_output(output: Path) -> None:
    """Refuse, before any weight loads, a file, a non-empty folder, or a folder that cannot be made."""
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise RecipeError(
            f"--output {output}: it exists and is not an empty folder; compose never overwrites: name a "
            "new folder (or empty this one)."
        )
    check_output_dir(output, "--output")


def check_text_only(name: str, config: dict[str, Any]) -> None:
    found = [key for key in _MULTIMODAL_KEYS if key in config]
    if found:
        raise RecipeError(
            f"--llm {name}: it is already a multimodal model (model type '{config.get('model_type')}', "
            f"its config has {', '.join(found)}); compose takes a text-only LLM (e.g. Qwen/Qwen3-8B). "
            "To fine-tune an existing MLLM, train it with its own template instead."
        )


def vision_geometry(name: str, config: dict[str, Any]) -> VisionGeometry:
    """Transformers' config gives the sizes: config.json omits defaults (SigLIP's ``patch_size`` 16)."""
    from transformers import AutoConfig  # lazy: seconds of import

    model_type = str(config.get("model_type"))
    encoder = ENCODER_OF_TYPE.get(model_type)
    if encoder is None:
        hint = (
            (
                " (SigLIP2's NaFlex models have variable resolution: take a fixed-resolution one such as "
                f"{DEFAULT_VISION})"
            )
            if model_type == "siglip2"
            else ""
        )
        raise RecipeError(
            f"--vision {name}: model type '{model_type}' is not an image encoder compose knows{hint}; "
            f"give a CLIP or SigLIP model: {DEFAULT_VISION} (the default, the HeRA paper's) or "
            "openai/clip-vit-large-patch14-336 (LLaVA-1.5's)."
        )
    full = AutoConfig.from_pretrained(name)
    vision = getattr(full, "vision_config", None) or full  # or the tower alone
    image_size = getattr(vision, "image_size", None)
    patch_size = getattr(vision, "patch_size", None)
    if not isinstance(image_size, int) or not isinstance(patch_size, int):
        raise RecipeError(
            f"--vision {name}: its vision config gives no image_size / patch_size (found {image_size} / "
            f"{patch_size}); give a fixed-resolution CLIP or SigLIP model."
        )
    cls_tokens, strategy = ENCODERS[encoder]
    return VisionGeometry(encoder, image_size, patch_size, cls_tokens, strategy)


def detect_family(name: str, config: dict[str, Any], tokenizer: Any) -> tuple[str, str]:
    model_type = str(config.get("model_type"))
    if model_type in _FAMILY_OF_TYPE:
        return _FAMILY_OF_TYPE[model_type], f"model type {model_type}"
    if model_type == "llama":
        if "<|eot_id|>" in tokenizer.get_vocab():
            return "llama3", "model type llama, Llama-3 tokenizer (<|eot_id|>)"
        if "[INST]" in str(getattr(tokenizer, "chat_template", None) or ""):
            return "llama2", "model type llama, Llama-2-chat chat template ([INST])"
        return "vicuna", "model type llama, Llama-2 tokenizer without Llama-2-chat's chat template"
    raise RecipeError(
        f"--llm {name}: model type '{model_type}' is of no LLM family compose has a template for; it "
        f"knows {', '.join(FAMILY_TEMPLATES)} (model types qwen2, qwen3, llama); pass --family with one "
        "of them to train in that family's conversation format."
    )


def plan_compose(
    llm: str, vision: str, output: Path, family: str | None = None, seed: int = 42
) -> tuple[ComposePlan, Any]:
    from transformers import AutoTokenizer  # lazy: seconds of import

    if family is not None and family not in FAMILY_TEMPLATES:
        raise RecipeError(
            f"--family {family}: no template for it; the families compose knows are {', '.join(FAMILY_TEMPLATES)}."
        )
    check_output(output)
    llm_config = _config_dict(llm, "--llm")
    check_text_only(llm, llm_config)
    geometry = vision_geometry(vision, _config_dict(vision, "--vision"))
    tokenizer = AutoTokenizer.from_pretrained(llm)
    found, reason = (family, "--family") if family else detect_family(llm, llm_config, tokenizer)
    return ComposePlan(llm, vision, output, found, reason, FAMILY_TEMPLATES[found][0], geometry, seed), tokenizer
