"""The frozen vision teacher (DINOv2 by default): loading, image preprocessing and features.

The teacher is kept outside the trained model, frozen and in eval mode, loaded once per process
and run under ``torch.no_grad`` in the compute dtype.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn


def check_teacher_source(name_or_path: str) -> None:
    """Fail fast (before the MLLM is loaded) when the teacher's config cannot be read or is not a vision model.

    Raises:
        ValueError: naming ``hera_teacher``, the value and the fix.
    """
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except Exception as err:  # noqa: BLE001 - any loading failure becomes one clear message
        raise ValueError(
            f"hera_teacher: cannot load '{name_or_path}' ({type(err).__name__}: {str(err).splitlines()[0]}). "
            "Give a Hugging Face vision model id that is cached locally or a local folder with config.json "
            "and preprocessor_config.json (e.g. facebook/dinov2-large)."
        ) from None
    if not is_vision_encoder_config(config):
        raise ValueError(
            f"hera_teacher: '{name_or_path}' is a '{config.model_type}' model, not a vision encoder. "
            "Use a self-supervised vision model such as facebook/dinov2-large (or a CLIP/SigLIP checkpoint, "
            "whose image tower is used)."
        )


# Dual image-text encoders whose image tower (``.vision_model``) can serve as teacher.
DUAL_ENCODER_TYPES = frozenset({"clip", "siglip", "siglip2"})


def is_vision_encoder_config(config: Any) -> bool:
    """True for pure vision encoders (config has image_size/patch_size and no text part) and CLIP/SigLIP."""
    if config.model_type in DUAL_ENCODER_TYPES:
        return True
    has_vision_shape = hasattr(config, "image_size") or hasattr(config, "patch_size")
    return has_vision_shape and not hasattr(config, "text_config") and not hasattr(config, "vocab_size")


def open_image(image: Any) -> Image.Image:
    """Open one LLaMA-Factory image entry (path, bytes, ``{"bytes"|"path"}`` dict or PIL image) as RGB."""
    if isinstance(image, dict):
        image = image.get("bytes") or image.get("path")
    if isinstance(image, bytes):
        image = Image.open(io.BytesIO(image))
    elif isinstance(image, str | Path):
        image = Image.open(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"cannot read image entry of type {type(image).__name__}")
    return image.convert("RGB")


def load_image_processor(name_or_path: str) -> Any:
    """The teacher's own image processor."""
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(name_or_path)


class VisionTeacher(nn.Module):
    """Frozen vision encoder returning one feature vector per image.

    ``feature="cls"``: last-layer [CLS] token; ``feature="mean"``: mean of the patch tokens
    (register tokens excluded where the config declares them).
    """

    def __init__(self, encoder: nn.Module, feature: str) -> None:
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        self.feature = feature
        self.num_prefix = 1 + int(getattr(encoder.config, "num_register_tokens", 0) or 0)

    def train(self, mode: bool = True) -> VisionTeacher:
        """The teacher stays in eval mode whatever the trainer asks."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[N, 3, h, w]`` pixels -> ``[N, E]`` features in the encoder's dtype."""
        param = next(self.encoder.parameters())
        hidden = self.encoder(pixel_values=pixel_values.to(param.device, param.dtype)).last_hidden_state  # [N, 1+P, E]
        if self.feature == "cls":
            return hidden[:, 0]
        return hidden[:, self.num_prefix:].mean(1)


_TEACHERS: dict[tuple[str, str, str, str], VisionTeacher] = {}


def load_teacher(name_or_path: str, feature: str, dtype: torch.dtype, device: torch.device | str) -> VisionTeacher:
    """Load (once per process and settings) the frozen teacher on ``device`` in ``dtype``."""
    from transformers import AutoModel

    key = (name_or_path, feature, str(dtype), str(device))
    if key not in _TEACHERS:
        from llamafactory_hera.patches.deepspeed import zero3_init_disabled

        with zero3_init_disabled():  # the teacher lives outside the DeepSpeed engine: never partition it
            encoder = AutoModel.from_pretrained(name_or_path, dtype=dtype)
        if hasattr(encoder, "vision_model"):  # CLIP/SigLIP-style dual encoders: keep the image tower only
            encoder = encoder.vision_model
        _TEACHERS[key] = VisionTeacher(encoder.to(device), feature)
    return _TEACHERS[key]


def per_sample_features(image_features: torch.Tensor, image_counts: torch.Tensor) -> torch.Tensor:
    """Average image features per sample.

    Args:
        image_features: ``[N_img, E]`` features of all images of the batch, sample by sample.
        image_counts: ``[B]`` number of images of each sample (sums to N_img).

    Returns:
        ``[B, E]`` float32; rows of samples without images are zero.
    """
    batch = image_counts.shape[0]
    owner = torch.repeat_interleave(torch.arange(batch, device=image_counts.device), image_counts)
    sums = torch.zeros(batch, image_features.shape[-1], device=image_features.device, dtype=torch.float32)
    sums.index_add_(0, owner.to(image_features.device), image_features.float())
    return sums / image_counts.to(sums.device).clamp_min(1).unsqueeze(-1).float()
