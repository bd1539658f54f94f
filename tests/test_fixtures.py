"""Tests for the tiny deterministic test fresh_assets (``llamafactory_hera.fixtures``)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from llamafactory_hera.fixtures import TEMPLATES, TinyAssets, build_tiny_assets  # noqa: E402

NUM_IMAGES = 12


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def fresh_assets(tmp_path_factory: pytest.TempPathFactory) -> TinyAssets:
    """A private build (12 images) so these tests never depend on the shared session cache."""
    return build_tiny_assets(tmp_path_factory.mktemp("tiny") / "fresh_assets", seed=0, num_images=NUM_IMAGES)


@pytest.fixture(scope="module")
def sample(fresh_assets: TinyAssets) -> dict:
    return json.loads((fresh_assets.dataset_dir / "hera_demo.json").read_text())[0]


def test_api_shape(fresh_assets: TinyAssets) -> None:
    assert set(fresh_assets.models) == {"qwen3_vl", "qwen2_5_vl", "llava"}
    assert (
        fresh_assets.templates
        == TEMPLATES
        == {"qwen3_vl": "qwen3_vl_nothink", "qwen2_5_vl": "qwen2_vl", "llava": "llava"}
    )
    assert all(p.is_dir() and (p / "config.json").is_file() for p in fresh_assets.models.values())
    assert (fresh_assets.teacher / "config.json").is_file()
    assert (fresh_assets.dataset_dir / "dataset_info.json").is_file()


def test_deterministic_and_seed_dependent(fresh_assets: TinyAssets, tmp_path: Path) -> None:
    import torch

    rng_state = torch.random.get_rng_state()
    twin = build_tiny_assets(tmp_path / "twin", seed=0, num_images=NUM_IMAGES)
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # the caller's RNG is left alone
    digests = _digests(fresh_assets.root)
    assert digests == _digests(twin.root)
    assert sum(name.endswith(".safetensors") for name in digests) == 4
    # Rebuilding the same root with another seed replaces the build; weights and images change.
    other = build_tiny_assets(tmp_path / "twin", seed=1, num_images=NUM_IMAGES)
    assert other.seed == 1 and other.root == twin.root
    changed = _digests(other.root)
    for name in ("models/qwen3_vl/model.safetensors", "teacher/model.safetensors", "data/images/0000.png"):
        assert changed[name] != digests[name]
    assert changed["models/llava/tokenizer.json"] == digests["models/llava/tokenizer.json"]  # seed-free corpus
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


def test_idempotent_reuse(fresh_assets: TinyAssets, tmp_path: Path) -> None:
    weights = fresh_assets.models["llava"] / "model.safetensors"
    before = weights.stat().st_mtime_ns
    again = build_tiny_assets(fresh_assets.root, seed=0, num_images=NUM_IMAGES)
    assert again == fresh_assets
    assert weights.stat().st_mtime_ns == before
    assert TinyAssets.from_root(fresh_assets.root) == fresh_assets
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("not ours")
    with pytest.raises(FileExistsError):
        build_tiny_assets(foreign)


def test_a_stale_build_moved_aside_by_a_concurrent_builder_first_is_no_error(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Two xdist workers finding the same stale build (another transformers' assets): both build, and the one that
    comes second to move the stale build aside found it gone (FileNotFoundError, seen on a switch of transformers in
    one checkout); it now installs its own build, which is complete."""
    import shutil

    from llamafactory_hera.fixtures.build import build_atomically

    root = tmp_path / "assets"
    root.mkdir()
    (root / "stamp").write_text("another transformers")
    real_replace = os.replace

    def replace_after_the_other_builder(source: Path, target: Path) -> None:
        if Path(source) == root and root.exists():  # the other builder moved the stale build aside just before
            shutil.rmtree(root)
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace_after_the_other_builder)
    ready = lambda: (root / "stamp").is_file() and (root / "stamp").read_text() == "this one"  # noqa: E731
    build_atomically(root, ready, lambda tmp: (tmp / "stamp").write_text("this one"))
    assert ready() and sorted(p.name for p in tmp_path.iterdir()) == ["assets"]


def test_dataset_info_valid(fresh_assets: TinyAssets) -> None:
    from llamafactory.data.parser import get_dataset_list

    info = json.loads((fresh_assets.dataset_dir / "dataset_info.json").read_text())
    attrs = get_dataset_list(["hera_demo", "hera_demo_mixed"], str(fresh_assets.dataset_dir))
    assert [a.formatting for a in attrs] == ["sharegpt", "sharegpt"]
    assert [a.images for a in attrs] == ["images", "images"]
    assert set(info) == {"hera_demo", "hera_demo_mixed"}
    text_only = 0
    for name in info:
        records = json.loads((fresh_assets.dataset_dir / info[name]["file_name"]).read_text())
        assert len(records) == NUM_IMAGES
        for rec in records:
            assert [m["role"] for m in rec["messages"]] == ["user", "assistant"]
            assert rec["messages"][0]["content"].count("<image>") == len(rec["images"])
            assert all((fresh_assets.dataset_dir / img).is_file() for img in rec["images"])
            text_only += not rec["images"]
    assert 0 < text_only < NUM_IMAGES


def test_captions_are_distinct_and_describe_their_image(fresh_assets: TinyAssets, tmp_path: Path) -> None:
    """Repeated captions make every head's text neighbourhoods tie (flat selection heatmap): each caption is unique."""
    from llamafactory_hera.fixtures.dataset import make_samples

    records = json.loads((fresh_assets.dataset_dir / "hera_demo.json").read_text())
    captions = [rec["messages"][1]["content"] for rec in records]
    assert len(set(captions)) == len(captions) == NUM_IMAGES
    for caption, row in zip(captions, json.loads((fresh_assets.dataset_dir / "metadata.json").read_text()),
                            strict=True):  # the caption says what was drawn, word for word
        assert caption.startswith(f"a {row['size']} {row['colour']} {row['shape']} {row['place']}"), caption
        assert caption.endswith(f"{row['background']} background"), caption
    many = [s.caption for s in make_samples(tmp_path, seed=0, num_images=64)]
    assert len(set(many)) == 64  # 8 groups x 4 places x 2 sizes


def test_assets_are_readable_by_other_users(fresh_assets: TinyAssets) -> None:
    """mkdtemp (0700) and safetensors (0600) modes must not leak into the build: others of a shared clone read it."""
    mask = os.umask(0)
    os.umask(mask)
    for path in [fresh_assets.root, *fresh_assets.root.rglob("*")]:
        expected = (0o777 if path.is_dir() else 0o666) & ~mask
        assert path.stat().st_mode & 0o777 == expected, f"{path}: {oct(path.stat().st_mode & 0o777)}"


@pytest.mark.parametrize("name", ["qwen3_vl", "qwen2_5_vl", "llava"])
def test_model_forward_with_image(fresh_assets: TinyAssets, sample: dict, name: str) -> None:
    import torch
    from PIL import Image
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from llamafactory_hera.fixtures.models import FAMILIES

    spec, path = FAMILIES[name], fresh_assets.models[name]
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    text_cfg = config.get_text_config()
    assert text_cfg.vocab_size == len(processor.tokenizer)
    assert (text_cfg.num_hidden_layers, text_cfg.num_attention_heads, text_cfg.num_key_value_heads) == (
        spec.num_layers,
        spec.num_heads,
        spec.num_kv_heads,
    )
    image_token_id = getattr(config, "image_token_id", None) or config.image_token_index
    assert processor.tokenizer.convert_ids_to_tokens(image_token_id) == processor.image_token

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    image = Image.open(fresh_assets.dataset_dir / sample["images"][0])
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    assert int((inputs["input_ids"] == image_token_id).sum()) == spec.image_tokens_per_image

    widths: list[int] = []
    layers = model.get_decoder().layers
    hooks = [
        layer.self_attn.o_proj.register_forward_hook(lambda m, a, o: widths.append(a[0].shape[-1])) for layer in layers
    ]
    with torch.no_grad():
        logits = model(**inputs).logits
    for hook in hooks:
        hook.remove()
    assert widths == [spec.num_heads * spec.head_dim] * spec.num_layers
    assert logits.shape[-1] == len(processor.tokenizer) and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ["qwen3_vl", "qwen2_5_vl", "llava"])
def test_llamafactory_template_expands_images(fresh_assets: TinyAssets, sample: dict, name: str) -> None:
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments, ModelArguments
    from llamafactory.model import load_tokenizer

    from llamafactory_hera.fixtures.models import FAMILIES

    module = load_tokenizer(ModelArguments(model_name_or_path=str(fresh_assets.models[name])))
    tokenizer, processor = module["tokenizer"], module["processor"]
    assert processor is not None
    template = get_template_and_fix_tokenizer(tokenizer, DataArguments(template=fresh_assets.templates[name]))
    images = [str(fresh_assets.dataset_dir / p) for p in sample["images"]]
    messages = template.mm_plugin.process_messages(sample["messages"], images, [], [], processor)
    prompt_ids, answer_ids = template.encode_oneturn(tokenizer, messages)
    image_id = tokenizer.convert_tokens_to_ids(template.mm_plugin.image_token)
    assert prompt_ids.count(image_id) == FAMILIES[name].image_tokens_per_image
    assert tokenizer.eos_token_id in answer_ids[-2:]


def test_teacher_cls_features(fresh_assets: TinyAssets, sample: dict) -> None:
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel

    processor = AutoImageProcessor.from_pretrained(fresh_assets.teacher)
    model = AutoModel.from_pretrained(fresh_assets.teacher).eval()
    image = Image.open(fresh_assets.dataset_dir / sample["images"][0])
    with torch.no_grad():
        out = model(**processor(images=[image, image], return_tensors="pt"))
    cls = out.last_hidden_state[:, 0]
    assert cls.shape == (2, model.config.hidden_size) and torch.isfinite(cls).all()
