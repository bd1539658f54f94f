"""Each teacher family's own image feature (``hera_teacher_feature: cls`` / ``mean``), against the encoder run and
pooled by hand; refusals of ``cls`` where no pooled feature exists and of unknown families."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel

from llamafactory_hera.hera.teacher import (
    check_teacher_source,
    load_image_processor,
    load_teacher,
    pack_naflex,
    unpack_naflex,
)
from llamafactory_hera_testing.teachers import TEACHER_FAMILIES, build_vision_teacher

SIZES = [(40, 40), (30, 60), (64, 20), (50, 33)]  # (height, width): SigLIP2 gets a different patch grid for each


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("teachers")
    return {family: build_vision_teacher(family, root / family, seed=1) for family in TEACHER_FAMILIES}


def _images() -> list[Image.Image]:
    rng = np.random.RandomState(0)
    return [Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in SIZES]


def _reference(family: str, folder: Path) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(cls, mean) from the raw HF model and processor, one image at a time, pooled by hand from the last block's
    hidden states (``hidden_states[-1]``, before any final norm) with the documented pooling of each family."""
    model = AutoModel.from_pretrained(folder).eval()
    processor = AutoImageProcessor.from_pretrained(folder)
    tower = getattr(model, "vision_model", model)
    cls_rows, mean_rows = [], []
    for image in _images():
        inputs = dict(processor([image], return_tensors="pt"))
        with torch.no_grad():
            hidden = tower(**inputs, output_hidden_states=True).hidden_states[-1][0]  # [T, E], no final norm
            if family in ("dinov2", "dinov2_registers", "vit"):  # [CLS] (+4 registers) then patches; final layernorm
                normed = tower.layernorm(hidden)
                prefix = 5 if family == "dinov2_registers" else 1
                cls, mean = normed[0], normed[prefix:].mean(0)
            elif family == "dinov3":  # [CLS], 4 registers, patches; final norm
                normed = tower.norm(hidden)
                cls, mean = normed[0], normed[5:].mean(0)
            elif family.startswith("clip"):  # image embedding = post_layernorm([CLS]); patches after [CLS]
                cls, mean = tower.post_layernorm(hidden[0]), hidden[1:].mean(0)
            else:  # SigLIP / SigLIP2: no [CLS]; post_layernorm, attention-pooling head over the real patches
                valid = int(inputs["pixel_attention_mask"].sum()) if "pixel_attention_mask" in inputs else len(hidden)
                normed = tower.post_layernorm(hidden)[:valid]
                mean = normed.mean(0)
                cls = tower.head(normed[None])[0] if getattr(tower, "head", None) is not None else None
        cls_rows.append(cls)
        mean_rows.append(mean)
    return (None if cls_rows[0] is None else torch.stack(cls_rows)), torch.stack(mean_rows)


@pytest.mark.parametrize("family", TEACHER_FAMILIES)
def test_teacher_feature_is_the_familys_own_pooled_image_feature(teachers, family: str) -> None:
    folder = teachers[family]
    want_cls, want_mean = _reference(family, folder)
    pixels = load_image_processor(str(folder))(_images(), return_tensors="pt")["pixel_values"]
    mean = load_teacher(str(folder), "mean", "cpu")(pixels)
    torch.testing.assert_close(mean, want_mean, atol=1e-5, rtol=1e-4)
    if want_cls is None:
        check_teacher_source(str(folder), "mean")
        with pytest.raises(ValueError, match="hera_teacher_feature: got 'cls'.*Set hera_teacher_feature: mean"):
            check_teacher_source(str(folder), "cls")
        with pytest.raises(ValueError, match="hera_teacher_feature: got 'cls'"):
            load_teacher(str(folder), "cls", "cpu")
        return
    check_teacher_source(str(folder), "cls")
    cls = load_teacher(str(folder), "cls", "cpu")(pixels)
    torch.testing.assert_close(cls, want_cls, atol=1e-5, rtol=1e-4)
    assert cls.dtype == mean.dtype == torch.float32 and cls.shape == (len(SIZES), 32)


@pytest.mark.parametrize("family", ["clip", "siglip", "siglip2"])
def test_dual_encoder_cls_is_the_image_embedding_before_any_projection(teachers, family: str) -> None:
    """The checkpoint's own ``get_image_features`` (CLIP: after ``visual_projection``) from the teacher's feature."""
    folder = teachers[family]
    model = AutoModel.from_pretrained(folder).eval()
    inputs = dict(AutoImageProcessor.from_pretrained(folder)(_images(), return_tensors="pt"))
    with torch.no_grad():
        want = model.get_image_features(**inputs).pooler_output
    got = load_teacher(str(folder), "cls", "cpu")(
        load_image_processor(str(folder))(_images(), return_tensors="pt")["pixel_values"])
    if family == "clip":
        got = model.visual_projection(got)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_naflex_rows_pack_and_unpack_losslessly_in_any_float_dtype(teachers) -> None:
    processor = AutoImageProcessor.from_pretrained(teachers["siglip2"])
    out = processor(_images(), return_tensors="pt")
    packed = pack_naflex(out["pixel_values"], out["spatial_shapes"])
    assert packed.shape == (len(SIZES), 16, 3 * 8 * 8 + 2)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        pixels, mask, grid = unpack_naflex(packed.to(dtype))
        assert torch.equal(grid, out["spatial_shapes"].long()) and torch.equal(mask, out["pixel_attention_mask"])
        assert torch.equal(pixels.float(), out["pixel_values"].to(dtype).float())
    # rows of separate calls concatenate like ordinary pixels (collator batches, teacher_batch chunks)
    halves = [pack_naflex(o["pixel_values"], o["spatial_shapes"]) for o in
              (processor(_images()[:2], return_tensors="pt"), processor(_images()[2:], return_tensors="pt"))]
    assert torch.equal(torch.cat(halves), packed)


def test_bf16_teacher_returns_float32_features_of_its_bf16_output(teachers) -> None:
    folder = teachers["dinov2"]
    pixels = load_image_processor(str(folder))(_images(), return_tensors="pt")["pixel_values"]
    teacher = load_teacher(str(folder), "cls", "cpu", dtype=torch.bfloat16)
    got = teacher(pixels)
    assert got.dtype == torch.float32
    with torch.no_grad():
        want = teacher.encoder(pixel_values=pixels.to(torch.bfloat16)).pooler_output.float()
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_unknown_vision_family_is_refused(tmp_path) -> None:
    from transformers import IJepaConfig

    IJepaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"hera_teacher: '.*' is a 'ijepa' vision model, whose image feature .*"
                                         r"Use a DINOv2 .* model"):
        check_teacher_source(str(tmp_path), "mean")
