"""The frozen vision teacher (DINOv2 by default): loading, preprocessing, features."""

from __future__ import annotations

import io
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm
from typing_extensions import override

from llamafactory_hera.runtime import save_signal
from llamafactory_hera.runtime.errors import RecipeError
from llamafactory_hera.runtime.log import line, progress_file, show
from llamafactory_hera_patches.engines.deepspeed import loaded_whole

# dual encoders whose image tower (``.vision_model``) can be the teacher
DUAL_ENCODER_TYPES = frozenset({"clip", "siglip", "siglip2"})
# towers whose last layer starts with [CLS] (then any registers), the feature: ``last_hidden_state[:, 0]``
FIRST_TOKEN_TYPES = frozenset({"dinov2", "dinov2_with_registers", "dinov3_vit", "vit"})
CLIP_TYPES = frozenset({"clip_vision_model"})  # feature: pooler_output = post_layernorm([CLS])
SIGLIP_TYPES = frozenset({"siglip_vision_model", "siglip2_vision_model"})  # no [CLS]; attention-pooling head
NAFLEX_TYPES = frozenset({"siglip2_vision_model"})  # padded patches + mask + grid
SUPPORTED_FAMILIES = "DINOv2 (with or without registers), DINOv3 ViT, ViT, CLIP, SigLIP, SigLIP2"


@dataclass(frozen=True)
class FeatureLayout:
    """Where an image tower keeps its feature. ``pooled``: where ``cls`` reads (None: refused); ``prefix``: leading
    non-patch tokens ``mean`` skips."""

    model_type: str
    pooled: str | None
    prefix: int
    naflex: bool = False


def feature_layout(config: Any) -> FeatureLayout | None:
    """A teacher config's layout (a dual encoder's ``vision_config``); ``None`` for an unknown family."""
    if config.model_type in DUAL_ENCODER_TYPES:
        config = config.vision_config
    model_type = getattr(config, "model_type", None)
    if model_type in FIRST_TOKEN_TYPES:
        return FeatureLayout(model_type, "first_token", 1 + int(getattr(config, "num_register_tokens", 0) or 0))
    if model_type in CLIP_TYPES:
        return FeatureLayout(model_type, "pooler", 1)
    if model_type in SIGLIP_TYPES:  # as the model: a head unless vision_use_head: false
        head = bool(getattr(config, "vision_use_head", True))
        return FeatureLayout(model_type, "pooler" if head else None, 0, naflex=model_type in NAFLEX_TYPES)
    return None


def looks_like_path(value: str) -> bool:
    """True for a local folder (Hub ids have one ``/`` at most)."""
    return (
        value.startswith((".", "/", "~"))
        or "\\" in value
        or value.count("/") > 1
        or (os.sep != "/" and os.sep in value)
    )


def resolve_teacher(name_or_path: str) -> str:
    """Expand a leading ``~`` (Hugging Face loaders do not)."""
    return os.path.expanduser(name_or_path) if name_or_path.startswith("~") else name_or_path


def check_teacher_source(name_or_path: str, feature: str | None = None) -> None:
    """Refuse, before the MLLM loads, a teacher that cannot serve (``feature=None``: the feature not checked)."""
    path = resolve_teacher(name_or_path)
    if looks_like_path(name_or_path) and not Path(path).is_dir():
        raise RecipeError(
            f"hera_teacher: folder '{name_or_path}' does not exist ({Path(path).absolute()}). Give an existing local "
            "folder with config.json and preprocessor_config.json, or a Hugging Face model id (e.g. "
            "facebook/dinov2-large)."
        )
    # lazy: `select` imports this module before its one-line checks
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as err:  # noqa: BLE001 - one clear message
        raise RecipeError(
            f"hera_teacher: cannot load '{name_or_path}' ({type(err).__name__}: {str(err).splitlines()[0]}). "
            "Give a Hugging Face vision model id that is cached locally or a local folder with config.json "
            "and preprocessor_config.json (e.g. facebook/dinov2-large)."
        ) from None
    if not is_vision_encoder_config(config):
        raise RecipeError(
            f"hera_teacher: '{name_or_path}' is a '{config.model_type}' model, not a vision encoder. "
            "Use a self-supervised vision model such as facebook/dinov2-large (or a CLIP/SigLIP model, "
            "whose image tower is used)."
        )
    check_feature(feature_layout(config), name_or_path, config.model_type, feature)


def check_feature(layout: FeatureLayout | None, name_or_path: str, model_type: str, feature: str | None) -> None:
    if layout is None:
        raise RecipeError(
            f"hera_teacher: '{name_or_path}' is a '{model_type}' vision model, whose image feature HeRA does not "
            f"know (which token holds it differs per family). Use a {SUPPORTED_FAMILIES} model, "
            "e.g. facebook/dinov2-large."
        )
    if feature == "cls" and layout.pooled is None:
        raise RecipeError(
            f"hera_teacher_feature: got 'cls', but the teacher '{name_or_path}' ({layout.model_type} with "
            "vision_use_head: false) has no [CLS] token and no attention-pooling head, so no pooled image feature. "
            "Set hera_teacher_feature: mean (the mean of its patch tokens), or use a model with its head."
        )


def is_vision_encoder_config(config: Any) -> bool:
    """True for pure vision encoders (image_size/patch_size, no text part) and CLIP/SigLIP."""
    if config.model_type in DUAL_ENCODER_TYPES:
        return True
    has_vision_shape = hasattr(config, "image_size") or hasattr(config, "patch_size")
    return has_vision_shape and not hasattr(config, "text_config") and not hasattr(config, "vocab_size")


def open_image(image: Any) -> Image.Image:
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
    """The teacher's image processor; SigLIP2's wrapped so one tensor carries each image."""
    from transformers import AutoImageProcessor  # lazy: as load_teacher's AutoModel

    processor = AutoImageProcessor.from_pretrained(resolve_teacher(name_or_path))
    if "spatial_shapes" in getattr(processor, "model_input_names", ()):
        return NaFlexProcessor(processor)
    return processor


class NaFlexProcessor:
    """SigLIP2's image processor, its three outputs packed into ``pixel_values`` ``[B, N, D + 2]``: the patches, then
    the ``h x w`` grid as two 0/1 channels (exact in any float dtype: rows survive the Trainer's casts and indexing).
    """

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, images: list[Any], return_tensors: str = "pt") -> dict[str, torch.Tensor]:
        out = self.processor(images, return_tensors="pt")
        return {"pixel_values": pack_naflex(out["pixel_values"], out["spatial_shapes"])}


def pack_naflex(pixel_values: torch.Tensor, spatial_shapes: torch.Tensor) -> torch.Tensor:
    """``[B, N, D]`` patches, ``[B, 2]`` grids -> ``[B, N, D + 2]`` (:class:`NaFlexProcessor`)."""
    positions = torch.arange(pixel_values.shape[1])  # [N]
    grid = spatial_shapes.to(torch.long).cpu()
    flags = (positions[None, :, None] < grid[:, None, :]).to(pixel_values.dtype)  # [B, N, 2]
    return torch.cat([pixel_values, flags.to(pixel_values.device)], dim=-1)


def unpack_naflex(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[B, N, D + 2]`` -> (``[B, N, D]`` patches, ``[B, N]`` int32 padding mask, ``[B, 2]`` long patch grids)."""
    grid = packed[..., -2:].float().sum(1).round().long()  # [B, 2]
    positions = torch.arange(packed.shape[1], device=packed.device)
    mask = (positions[None] < (grid[:, 0] * grid[:, 1])[:, None]).to(torch.int32)  # [B, N]
    return packed[..., :-2], mask, grid


class VisionTeacher(nn.Module):
    """Frozen image tower: one float32 feature per image. ``cls``: the pooled feature; ``mean``: mean of the last
    layer's patch tokens."""

    def __init__(self, encoder: nn.Module, feature: str, name: str = "the teacher", source: str | None = None) -> None:
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        self.feature = feature
        self.source = source  # hera_teacher as given: names its shared features
        layout = feature_layout(encoder.config)
        check_feature(layout, name, str(getattr(encoder.config, "model_type", "?")), feature)
        assert layout is not None
        self.layout = layout

    @override
    def train(self, mode: bool = True) -> VisionTeacher:
        # eval mode whatever the trainer asks
        return super().train(False)

    @torch.no_grad()
    @override
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[N, 3, h, w]`` pixels (SigLIP2: ``[N, P, D + 2]`` packed) -> ``[N, E]`` float32 features."""
        param = next(self.encoder.parameters())
        # pinned pixels go up asynchronously; a copy to the CPU must finish before use
        pixel_values = pixel_values.to(param.device, non_blocking=param.device.type == "cuda")
        mask = None
        if self.layout.naflex:
            patches, mask, grid = unpack_naflex(pixel_values)
            out = self.encoder(pixel_values=patches.to(param.dtype), pixel_attention_mask=mask, spatial_shapes=grid)
        else:
            out = self.encoder(pixel_values=pixel_values.to(param.dtype))
        if self.feature == "cls":
            pooled = out.last_hidden_state[:, 0] if self.layout.pooled == "first_token" else out.pooler_output
            return pooled.float()
        tokens = out.last_hidden_state[:, self.layout.prefix :].float()  # [N, P, E]
        if mask is None:
            return tokens.mean(1)
        weights = mask[:, self.layout.prefix :].to(tokens.dtype).unsqueeze(-1)  # [N, P, 1]
        return (tokens * weights).sum(1) / weights.sum(1).clamp_min(1)


_TEACHERS: dict[tuple[str, str, str, str], VisionTeacher] = {}


# float32 in training and selection: bf16 reorders near-tied neighbours (36 of 512 DINOv2 [CLS] kNN sets), and
# one dtype keeps every path's features identical.
TEACHER_DTYPE = torch.float32
KEEP_ROWS = 4096  # rows a pass hands on at a time (16 MB of DINOv2-L)


def load_teacher(
    name_or_path: str, feature: str, device: torch.device | str, *, dtype: torch.dtype = TEACHER_DTYPE
) -> VisionTeacher:
    """The frozen teacher, loaded once per process and settings."""
    # lazy: model classes would delay the checks importing this module
    from transformers import AutoModel, __version__

    key = (name_or_path, feature, str(dtype), str(device))
    if key not in _TEACHERS:
        # transformers 4.55 takes torch_dtype (as stacks.dtype_key, not imported: the trainer's import closure)
        dtype_key = "torch_dtype" if __version__.startswith("4.55.") else "dtype"
        with loaded_whole():  # outside DeepSpeed / FSDP: whole on every rank
            encoder = AutoModel.from_pretrained(resolve_teacher(name_or_path), **{dtype_key: dtype})
        if hasattr(encoder, "vision_model"):  # dual encoder: the image tower only
            encoder = encoder.vision_model
        _TEACHERS[key] = VisionTeacher(encoder.to(device), feature, name_or_path, source=name_or_path)
    return _TEACHERS[key]


def per_sample_features(
    image_features: torch.Tensor, image_counts: torch.Tensor, num_images: int | None = None, one_each: bool = False
) -> torch.Tensor:
    """``[B, E]`` float32: each sample's mean of its images' L2-normalised ``[N_img, E]`` features (zero without
    images). ``num_images``: N_img if known (no device wait)."""
    if one_each:
        return F.normalize(image_features.float(), dim=-1)
    batch = image_counts.shape[0]
    owner = torch.repeat_interleave(
        torch.arange(batch, device=image_counts.device), image_counts, output_size=num_images
    )
    sums = torch.zeros(batch, image_features.shape[-1], device=image_features.device, dtype=torch.float32)
    sums.index_add_(0, owner.to(image_features.device), F.normalize(image_features.float(), dim=-1))
    return sums / image_counts.to(sums.device).clamp_min(1).unsqueeze(-1).float()


def prefetch_workers(device: torch.device) -> int:
    """Image decoding threads: half the CPUs, 1 to 8, on an accelerator; 0 on the CPU, where they would compete
    with the forward (bench/README.md)."""
    return 0 if device.type == "cpu" else max(1, min(8, (os.cpu_count() or 2) // 2))


def teacher_batch_size(batch_size: int) -> int:
    """4x the LM's batch, at least 32: a ViT's short sequences gain from wider GEMMs (bench/selection.py)."""
    return max(32, 4 * batch_size)


def batches_of(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def continuing(found: int, total: int, desc: str) -> None:
    if found and found < total:
        show(line(f"{desc}: continuing from {found} of {total} rows (kept by an earlier pass)."))


def image_features(
    teacher: VisionTeacher,
    image_processor: Any,
    images: list[Any],
    batch_size: int,
    workers: int | None = None,
    progress: bool = True,
    desc: str = "teacher features",
    opener: Callable[[Any], Any] = open_image,
    keep: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """``[N, E]`` float32 features of ``images`` on the teacher's device; ``workers`` threads (PIL releases the GIL)
    prepare batches ahead. ``keep(first row, rows)`` gets rows every :data:`KEEP_ROWS` or more."""

    def pixels(batch: list[Any]) -> torch.Tensor:
        return image_processor([opener(image) for image in batch], return_tensors="pt")["pixel_values"]

    batches = list(batches_of(images, batch_size))
    if workers is None:
        workers = prefetch_workers(next(teacher.parameters()).device)
    chunks = []
    kept = 0  # batches handed to keep
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="hera-teacher-images") as pool:
        pending = deque(pool.submit(pixels, b) for b in batches[: workers + 1] if workers)
        for index in tqdm(range(len(batches)), desc=desc, disable=not progress, file=progress_file()):
            if workers:
                batch_pixels = pending.popleft().result()
                if index + workers + 1 < len(batches):
                    pending.append(pool.submit(pixels, batches[index + workers + 1]))
            else:
                batch_pixels = pixels(batches[index])
            chunks.append(teacher(batch_pixels))
            if keep is not None and ((index + 1 - kept) * batch_size >= KEEP_ROWS or index + 1 == len(batches)):
                keep(kept * batch_size, torch.cat(chunks[kept:]))
                kept = index + 1
                save_signal.stop_before_step("the teacher features computed so far kept in its store")
    if not chunks:
        param = next(teacher.parameters())
        return torch.zeros(0, int(teacher.encoder.config.hidden_size), dtype=torch.float32, device=param.device)
    return torch.cat(chunks)
