"""The frozen teacher: features, frozen state, image entry forms, the same weights on every rank."""

from __future__ import annotations

import io
import json
import multiprocessing
import re
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist
from PIL import Image

from conftest import free_port
from llamafactory_hera.hera.teacher import (
    check_teacher_source,
    load_image_processor,
    load_teacher,
    looks_like_path,
    open_image,
    per_sample_features,
)
from llamafactory_hera.hera.teacher_run import check_same_on_every_rank


def _pixels(assets, count: int = 3) -> torch.Tensor:
    rows = json.loads((assets.dataset_dir / "hera_demo.json").read_text())[:count]
    images = [Image.open(assets.dataset_dir / row["images"][0]) for row in rows]
    return load_image_processor(str(assets.teacher))(images, return_tensors="pt")["pixel_values"]


def test_cls_and_mean_features_match_the_encoder_output(assets) -> None:
    pixels = _pixels(assets)
    cls_teacher = load_teacher(str(assets.teacher), "cls", "cpu")
    mean_teacher = load_teacher(str(assets.teacher), "mean", "cpu")
    hidden = cls_teacher.encoder(pixel_values=pixels).last_hidden_state  # [N, 1+P, E]
    torch.testing.assert_close(cls_teacher(pixels), hidden[:, 0])
    torch.testing.assert_close(mean_teacher(pixels), hidden[:, 1:].mean(1))
    assert load_teacher(str(assets.teacher), "cls", "cpu") is cls_teacher  # once per process
    # float32 unless asked: training and head selection load it without a dtype (selection used the model's)
    assert next(cls_teacher.encoder.parameters()).dtype == torch.float32


def test_teacher_is_frozen_and_stays_in_eval_mode(assets) -> None:
    teacher = load_teacher(str(assets.teacher), "cls", "cpu")
    teacher.train()
    assert not teacher.training and not teacher.encoder.training
    assert not any(p.requires_grad for p in teacher.parameters())
    assert teacher(_pixels(assets, 2)).requires_grad is False


def test_feature_layout_per_family_from_the_config_alone() -> None:
    """[CLS] and registers are left out of ``mean`` where the family has them; SigLIP has neither."""
    from transformers import (
        CLIPConfig,
        Dinov2Config,
        Dinov2WithRegistersConfig,
        DINOv3ViTConfig,
        SiglipConfig,
        SiglipVisionConfig,
    )

    from llamafactory_hera.hera.teacher import feature_layout

    layouts = {name: feature_layout(config) for name, config in {
        "dinov2": Dinov2Config(), "registers": Dinov2WithRegistersConfig(num_register_tokens=4),
        "dinov3": DINOv3ViTConfig(num_register_tokens=4), "clip": CLIPConfig(), "siglip": SiglipConfig(),
        "siglip_nohead": SiglipVisionConfig(vision_use_head=False)}.items()}
    assert {name: (lay.pooled, lay.prefix) for name, lay in layouts.items()} == {
        "dinov2": ("first_token", 1), "registers": ("first_token", 5), "dinov3": ("first_token", 5),
        "clip": ("pooler", 1), "siglip": ("pooler", 0), "siglip_nohead": (None, 0)}


def test_open_image_accepts_every_llamafactory_form(assets, tmp_path) -> None:
    path = assets.dataset_dir / "images" / "0000.png"
    data = path.read_bytes()
    forms = [str(path), path, data, {"bytes": data, "path": None}, {"bytes": None, "path": str(path)},
             Image.open(io.BytesIO(data))]
    sizes = {open_image(form).size for form in forms}
    assert len(sizes) == 1 and all(open_image(form).mode == "RGB" for form in forms)


def test_image_keys_follow_content(tmp_path) -> None:
    import os

    from llamafactory_hera.hera.teacher_cache import image_key

    path = tmp_path / "x.png"
    Image.new("RGB", (4, 4)).save(path)
    key = image_key(str(path))
    assert key == image_key({"path": str(path), "bytes": None}) and key.startswith("path:")
    os.utime(path, ns=(1, 1))
    assert image_key(str(path)) != key  # a rewritten file is a new image
    data = path.read_bytes()
    assert image_key(data) == image_key({"bytes": data, "path": None}) != image_key(data + b"0")
    assert image_key(Image.open(path)) is None and image_key(str(tmp_path / "missing.png")) is None


@pytest.mark.parametrize("value", ["./no/such/dir", "no/such/dir", "/no/such/hera/teacher", "~/no-such-hera-teacher"])
def test_missing_teacher_folder_is_reported_as_a_folder(value: str) -> None:
    with pytest.raises(ValueError, match=rf"hera_teacher: folder '{re.escape(value)}' does not exist .*Give an "
                                         "existing local folder"):
        check_teacher_source(value)


def test_hub_ids_are_not_taken_for_folders_and_tilde_is_expanded(assets, tmp_path, monkeypatch) -> None:
    assert not looks_like_path("facebook/dinov2-large") and not looks_like_path("dinov2")
    assert all(looks_like_path(v) for v in ("./t", "../t", "/t", "~/t", "a/b/c", "C:\\models\\t"))
    with pytest.raises(ValueError, match="hera_teacher: cannot load 'no-org/no-such-teacher'"):
        check_teacher_source("no-org/no-such-teacher")  # offline: a Hub id keeps the Hub's message
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "teacher").symlink_to(assets.teacher, target_is_directory=True)
    check_teacher_source("~/teacher", "cls")
    image = open_image(assets.dataset_dir / "images" / "0000.png")
    pixels = load_image_processor("~/teacher")([image], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixels, load_image_processor(str(assets.teacher))([image], return_tensors="pt")[
        "pixel_values"])
    want = load_teacher(str(assets.teacher), "cls", "cpu")(pixels)
    torch.testing.assert_close(load_teacher("~/teacher", "cls", "cpu")(pixels), want)


def test_per_sample_features_are_means_of_unit_image_features() -> None:
    """Brute force: per sample, the mean of its images' L2-normalised features; zero without images."""
    torch.manual_seed(0)
    counts = torch.tensor([2, 0, 1, 3, 1, 4])
    feats = torch.randn(int(counts.sum()), 8) * torch.logspace(-2, 2, int(counts.sum())).unsqueeze(-1)
    want, start = [], 0
    for count in counts.tolist():
        rows = [feats[start + i] / feats[start + i].norm() for i in range(count)]
        want.append(torch.stack(rows).mean(0) if rows else torch.zeros(8))
        start += count
    got = per_sample_features(feats.to(torch.bfloat16).float(), counts)
    torch.testing.assert_close(got, per_sample_features(feats.to(torch.bfloat16), counts))  # any input dtype
    torch.testing.assert_close(per_sample_features(feats, counts), torch.stack(want))
    # every image weighs the same, whatever its norm: scaling one image of a sample changes nothing
    scaled = feats.clone()
    scaled[0] *= 1000
    torch.testing.assert_close(per_sample_features(scaled, counts), per_sample_features(feats, counts))
    # one image each (the collator says so): the same values without the sums
    ones = torch.ones(5, dtype=torch.long)
    assert torch.equal(per_sample_features(feats[:5], ones, one_each=True), per_sample_features(feats[:5], ones))


def test_features_are_float32_through_batching_selection_and_precompute(assets) -> None:
    """A bf16 teacher: ``image_features``, ``collect_teacher`` (several images per pair) and the precomputed cache
    hold float32, equal to the brute-force float32 conversion of the teacher's rows."""
    from llamafactory_hera.hera.selection.collect import CalibrationPair, collect_teacher
    from llamafactory_hera.hera.teacher import image_features
    from llamafactory_hera.hera.teacher_cache import TeacherFeatureCache
    from llamafactory_hera.hera.teacher_run import precompute_teacher_features, training_images

    teacher = load_teacher(str(assets.teacher), "cls", "cpu", dtype=torch.bfloat16)
    processor = load_image_processor(str(assets.teacher))
    paths = [str(p) for p in sorted((assets.dataset_dir / "images").glob("*.png"))[:5]]
    single = torch.stack([teacher(processor([open_image(p)], return_tensors="pt")["pixel_values"])[0] for p in paths])
    assert single.dtype == torch.float32
    feats = image_features(teacher, processor, paths, 2, workers=0, progress=False)
    assert feats.dtype == torch.float32 and image_features(teacher, processor, [], 2, 0, False).dtype == torch.float32
    torch.testing.assert_close(feats, single, atol=0.02, rtol=0.02)  # bf16 GEMMs of other batch shapes
    pairs = [CalibrationPair(0, "a", tuple(paths[:3])), CalibrationPair(1, "b", (paths[3],)),
             CalibrationPair(2, "c", (paths[4], paths[0]))]
    got = collect_teacher(teacher, processor, pairs, 8, progress=False, workers=0)
    unit = torch.nn.functional.normalize(image_features(teacher, processor, paths + [paths[0]], 8, 0, False), dim=-1)
    want = torch.stack([unit[:3].mean(0), unit[3], unit[4:6].mean(0)])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)
    cache = TeacherFeatureCache()
    by_key, _ = training_images([paths[:3], paths[3:]])
    precompute_teacher_features(teacher, processor, by_key, cache, 8, open_image, progress=False)
    stored = {key: row for key, row in cache.features.items()}
    assert len(stored) == 5 and all(row.dtype == torch.float32 for row in stored.values())


def test_rows_new_to_the_cache_are_read_only_after_their_copy_has_run(monkeypatch) -> None:
    """A row computed on an accelerator reaches the cache by a copy the host does not wait for; a later lookup of that
    row first waits for its copy's event (only when the event has not completed), a lookup of other rows does not."""
    from llamafactory_hera.hera import teacher_cache

    class Event:  # a CUDA event whose copy has not run until something waits for it
        def __init__(self) -> None:
            self.done, self.waits = False, 0

        def query(self) -> bool:
            return self.done

        def synchronize(self) -> None:
            self.waits, self.done = self.waits + 1, True

    events: list[Event] = []

    def rows_to_host(computed: torch.Tensor) -> tuple[torch.Tensor, Event]:
        events.append(Event())
        return computed.detach().clone(), events[-1]

    monkeypatch.setattr(teacher_cache, "rows_to_host", rows_to_host)
    cache = teacher_cache.TeacherFeatureCache()
    a, b = torch.randn(1, 4), torch.randn(1, 4)
    cache.lookup(["a"], a, ["a"])
    cache.lookup(["b"], b, ["b"])
    assert [e.waits for e in events] == [0, 0]  # nothing read yet
    torch.testing.assert_close(cache.lookup(["a", "c"], torch.randn(1, 4), ["c"])[0], a[0])
    assert [e.waits for e in events[:2]] == [1, 0]  # only the copy that brings "a"
    events[1].done = True  # "b"'s copy ran meanwhile: read without a wait
    torch.testing.assert_close(cache.lookup(["b"], None, []), b)
    assert [e.waits for e in events] == [1, 0, 0]
    for event in events:
        event.done = True
    cache.lookup(["d"], torch.randn(1, 4), ["d"])
    assert len(cache._copying) == 1  # the copies that ran are not kept: only "d"'s



def _same_teacher_rank(rank: int, port: int, results: Any) -> None:
    """One of two gloo ranks, forked (the modules already imported): rank 0's teacher ``[1, -1]``, rank 1's ``[0, 0]``;
    what ``check_same_on_every_rank`` did on this rank goes to ``results``."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    teacher = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        teacher.weight.copy_(torch.tensor([[1.0, -1.0]]) if rank == 0 else torch.zeros(1, 2))
    try:
        check_same_on_every_rank(teacher, "hera_teacher", "tiny-dino")
        results.put((rank, "passed"))
    except ValueError as error:
        results.put((rank, str(error)))


def test_a_teacher_that_differs_on_another_rank_is_refused_by_every_rank() -> None:
    """``check_same_on_every_rank`` itself on two gloo ranks, without the plugin's job-refusal watcher (which would end
    a rank that did not refuse): a teacher ``[1, -1]`` on rank 0 and ``[0, 0]`` on rank 1 (the same sum, 0) is refused
    by each rank, by the absolute sum."""
    context = multiprocessing.get_context("fork")
    results, port = context.SimpleQueue(), free_port()
    ranks = [context.Process(target=_same_teacher_rank, args=(rank, port, results)) for rank in (0, 1)]
    for rank in ranks:
        rank.start()
    for rank in ranks:
        rank.join(timeout=60)
        rank.kill()
    line = ("hera_teacher: 'tiny-dino' loaded with other weights on some ranks (sum, absolute sum: rank 0: 0, 2; "
            "rank 1: 0, 0), so each rank would align to another teacher. Give every node the same copy of it.")
    assert sorted(results.get() for _ in range(2) if not results.empty()) == [(0, line), (1, line)]
