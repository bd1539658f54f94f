"""The frozen teacher: features, frozen state, image entry forms."""

from __future__ import annotations

import io
import json

import torch
from PIL import Image

from llamafactory_hera.teacher import VisionTeacher, load_image_processor, load_teacher, open_image


def _pixels(assets, count: int = 3) -> torch.Tensor:
    rows = json.loads((assets.dataset_dir / "hera_demo.json").read_text())[:count]
    images = [Image.open(assets.dataset_dir / row["images"][0]) for row in rows]
    return load_image_processor(str(assets.teacher))(images, return_tensors="pt")["pixel_values"]


def test_cls_and_mean_features_match_the_encoder_output(assets) -> None:
    pixels = _pixels(assets)
    cls_teacher = load_teacher(str(assets.teacher), "cls", torch.float32, "cpu")
    mean_teacher = load_teacher(str(assets.teacher), "mean", torch.float32, "cpu")
    hidden = cls_teacher.encoder(pixel_values=pixels).last_hidden_state  # [N, 1+P, E]
    torch.testing.assert_close(cls_teacher(pixels), hidden[:, 0])
    torch.testing.assert_close(mean_teacher(pixels), hidden[:, 1:].mean(1))
    assert load_teacher(str(assets.teacher), "cls", torch.float32, "cpu") is cls_teacher  # once per process


def test_teacher_is_frozen_and_stays_in_eval_mode(assets) -> None:
    teacher = load_teacher(str(assets.teacher), "cls", torch.float32, "cpu")
    teacher.train()
    assert not teacher.training and not teacher.encoder.training
    assert not any(p.requires_grad for p in teacher.parameters())
    assert teacher(_pixels(assets, 2)).requires_grad is False


def test_register_tokens_are_left_out_of_the_patch_mean() -> None:
    encoder = torch.nn.Module()
    encoder.config = type("Config", (), {"num_register_tokens": 4})()
    assert VisionTeacher(encoder, "mean").num_prefix == 5


def test_open_image_accepts_every_llamafactory_form(assets, tmp_path) -> None:
    path = assets.dataset_dir / "images" / "0000.png"
    data = path.read_bytes()
    forms = [str(path), path, data, {"bytes": data, "path": None}, {"bytes": None, "path": str(path)},
             Image.open(io.BytesIO(data))]
    sizes = {open_image(form).size for form in forms}
    assert len(sizes) == 1 and all(open_image(form).mode == "RGB" for form in forms)


def test_image_keys_follow_content(tmp_path) -> None:
    import os

    from llamafactory_hera.teacher_cache import image_key

    path = tmp_path / "x.png"
    Image.new("RGB", (4, 4)).save(path)
    key = image_key(str(path))
    assert key == image_key({"path": str(path), "bytes": None}) and key.startswith("path:")
    os.utime(path, ns=(1, 1))
    assert image_key(str(path)) != key  # a rewritten file is a new image
    data = path.read_bytes()
    assert image_key(data) == image_key({"bytes": data, "path": None}) != image_key(data + b"0")
    assert image_key(Image.open(path)) is None and image_key(str(tmp_path / "missing.png")) is None
