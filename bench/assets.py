"""Benchmark assets: MLLMs with real or realistic proportions and random weights, a DINOv2 teacher, data.

Built offline and deterministically from the tiny test assets (tokenizer, chat template, processor,
procedural image-caption dataset), with the architecture dimensions of a preset:

- ``cpu-mid`` (default): a Qwen2.5-VL whose text decoder is 512 wide, 8 layers, 8 query heads of 64
  (GQA with 2 KV heads), MLP 3x wide (Qwen3-8B's proportions scaled down: 4096 wide, 36 layers,
  32 heads of 128, 8 KV heads, MLP 3x); DINOv2 teacher 96 wide, 4 layers, 112 px crops (64 patches).
  float32. Per sample the teacher costs about 1.4 % of the LM's forward+backward (DINOv2-L next to an
  8B LLM: about 0.5 %), so the CPU benchmark is conservative.
- ``qwen3-vl-8b``: the published Qwen3-VL-8B architecture (text 4096 x 36 layers, 32 heads, 8 KV heads,
  head_dim 128, vocabulary 151,936; vision tower 1152 x 27 layers with DeepStack at 8/16/24), bf16.
- ``qwen2.5-vl-7b``: the published Qwen2.5-VL-7B architecture (text 3584 x 28 layers, 28 heads, 4 KV
  heads, vocabulary 152,064; vision tower 1280 x 32 layers, window attention), bf16.

The language-model shapes and model-card sizes of the real presets are read from ``recipes/memory.py``
(one table for the recipes' memory estimates and the benchmarks). Both use the DINOv2-L teacher
architecture (1024 x 24 layers, 16 heads, patch 14, 256 px resize and 224 px centre crop, as
``facebook/dinov2-large``) and feed the MLLM 448 x 448 images (Qwen3-VL: 196 visual tokens,
Qwen2.5-VL: 256). Their weights are random (the benchmark measures cost, not quality); tokenizer
and chat template are the tiny test ones (ids < 512).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llamafactory_hera.fixtures import build_tiny_assets

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parents[1]


def _recipes_memory() -> Any:
    """``recipes/memory.py``: the backbones' language-model shapes and model-card sizes, kept in one place."""
    spec = importlib.util.spec_from_file_location("hera_recipes_memory", REPO / "recipes" / "memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


MEMORY = _recipes_memory()


def backbone_text(stem: str, **extra: Any) -> dict[str, Any]:
    """Text-config keys of a recipe backbone (``recipes/memory.py`` BACKBONES, by recipe stem) plus ``extra``."""
    b = next(b for b in MEMORY.BACKBONES if b.stem == stem)
    return {"hidden_size": b.hidden, "intermediate_size": b.intermediate, "num_hidden_layers": b.layers,
            "num_attention_heads": b.heads, "num_key_value_heads": b.kv_heads, "head_dim": b.head_dim,
            "vocab_size": b.vocab, **extra}


def published_params(stem: str) -> tuple[float, float]:
    """(MLLM, teacher) parameters as the model cards give them."""
    b = next(b for b in MEMORY.BACKBONES if b.stem == stem)
    return b.params_b * 1e9, MEMORY.TEACHER_PARAMS


def mrope_sections(head_dim: int) -> list[int]:
    """mRoPE (temporal, height, width) sections covering ``head_dim / 2`` for a scaled-down Qwen-VL."""
    half = head_dim // 2
    return [half // 2, half // 4, half - half // 2 - half // 4]


DINOV2_LARGE = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "mlp_ratio": 4,
                "patch_size": 14, "image_size": 518, "layerscale_value": 1.0}
DINOV2_LARGE_PROCESSOR = {"crop_size": {"height": 224, "width": 224}, "size": {"shortest_edge": 256}}


@dataclass(frozen=True)
class Preset:
    """Architecture of a benchmark model and its teacher.

    ``text`` / ``vision`` / ``teacher`` override the tiny fixture's config keys; ``image_side`` (pixels)
    fixes the MLLM processor's image area to ``image_side**2`` (None: keep the tiny processor's);
    ``published_params`` (total parameters, MLLM and teacher) is what the real checkpoints report,
    checked by the tests on a meta-device copy.
    """

    name: str
    family: str
    text: dict[str, Any]
    vision: dict[str, Any]
    teacher: dict[str, Any]
    teacher_processor: dict[str, Any]
    dtype: str
    cutoff_len: int
    image_side: int | None = None
    published_params: tuple[float, float] | None = None


PRESETS: dict[str, Preset] = {
    "cpu-mid": Preset(
        name="cpu-mid", family="qwen2_5_vl",
        text={"hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 2,
              "intermediate_size": 1536},
        vision={"out_hidden_size": 512},
        teacher={"hidden_size": 96, "num_hidden_layers": 4, "num_attention_heads": 3, "image_size": 112},
        teacher_processor={"crop_size": {"height": 112, "width": 112}, "size": {"shortest_edge": 128}},
        dtype="float32", cutoff_len=256),
    "qwen3-vl-8b": Preset(
        name="qwen3-vl-8b", family="qwen3_vl",
        text=backbone_text("qwen3_8b", rms_norm_eps=1e-6, max_position_embeddings=262144, rope_parameters={
            "mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_theta": 5000000.0, "rope_type": "default"}),
        vision={"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16, "out_hidden_size": 4096,
                "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 2304,
                "deepstack_visual_indexes": [8, 16, 24], "hidden_act": "gelu_pytorch_tanh"},
        teacher=DINOV2_LARGE, teacher_processor=DINOV2_LARGE_PROCESSOR, dtype="bfloat16", cutoff_len=1024,
        image_side=448, published_params=published_params("qwen3_8b")),
    "qwen2.5-vl-7b": Preset(
        name="qwen2.5-vl-7b", family="qwen2_5_vl",
        text=backbone_text("qwen2_5_7b", rms_norm_eps=1e-6, max_position_embeddings=128000, rope_parameters={
            "mrope_section": [16, 24, 24], "rope_theta": 1000000.0, "rope_type": "default"}),
        vision={"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 3584,
                "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
                "fullatt_block_indexes": [7, 15, 23, 31], "hidden_act": "silu"},
        teacher=DINOV2_LARGE, teacher_processor=DINOV2_LARGE_PROCESSOR, dtype="bfloat16", cutoff_len=1024,
        image_side=448, published_params=published_params("qwen2_5_7b")),
}



def smoke_preset(spec: Preset) -> Preset:
    """A real preset shrunk to seconds on a CPU: same family, dtype, image size, cutoff and config keys, tiny widths.

    It exercises the GPU command path (bf16 checkpoint, 448 px images, long sequences, heads spread over
    the depth) without the 17 GB of weights; its timings mean nothing.
    """
    text = {**spec.text, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 8,
            "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 512}
    if "head_dim" in text:
        text["head_dim"] = 8
    rope = {**text["rope_parameters"], "mrope_section": mrope_sections(8)}
    text["rope_parameters"] = rope
    vision = {**spec.vision, "depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
              "out_hidden_size": 64}
    for key, value in (("deepstack_visual_indexes", [1]), ("fullatt_block_indexes", [1])):
        if key in vision:
            vision[key] = value
    teacher = {**spec.teacher, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
    return replace(spec, name=f"{spec.name}-smoke", text=text, vision=vision, teacher=teacher, published_params=None)


def depth_preset(spec: Preset) -> Preset:
    """A real preset's depth at its smoke preset's widths: every decoder layer and vision block the published model
    has (Qwen3-VL-8B: 36 and 27, DeepStack at 8/16/24), each tiny. What a step dispatches per layer (aten ops,
    Python calls, checkpointing, hooks) is counted as the real model makes it, in seconds on a CPU."""
    smoke = smoke_preset(spec)
    text = {**smoke.text, "num_hidden_layers": spec.text["num_hidden_layers"]}
    vision = {**smoke.vision, "depth": spec.vision["depth"]}
    for key in ("deepstack_visual_indexes", "fullatt_block_indexes"):
        if key in spec.vision:
            vision[key] = spec.vision[key]
    return replace(smoke, name=f"{spec.name}-depth", text=text, vision=vision)


for _name in ("qwen3-vl-8b", "qwen2.5-vl-7b"):
    PRESETS[f"{_name}-smoke"] = smoke_preset(PRESETS[_name])
    PRESETS[f"{_name}-depth"] = depth_preset(PRESETS[_name])

@dataclass(frozen=True)
class BenchAssets:
    """Paths of the benchmark model, teacher and data, and the preset they were built from."""

    model: Path
    teacher: Path
    dataset_dir: Path
    template: str
    preset: Preset

    def hera_heads(self) -> list[str]:
        """Five heads spread over the depth (for 8 layers: L7H1, L3H5, L2H2, L7H7, L5H0)."""
        layers = int(self.preset.text.get("num_hidden_layers", 8))
        heads = int(self.preset.text.get("num_attention_heads", 8))
        picks = [(layers - 1, 1), (layers // 2 - 1, 5), (layers // 4, 2), (layers - 1, 7), (5 * layers // 8, 0)]
        return [f"L{layer}H{head % heads}" for layer, head in picks]


def model_config(preset: Preset, tiny_model: Path) -> Any:
    """The tiny fixture's MLLM config with the preset's dimensions."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model)
    text, vision = config.text_config, config.vision_config
    for key, value in preset.text.items():
        setattr(text, key, value)
    for key, value in preset.vision.items():
        setattr(vision, key, value)
    if getattr(text, "layer_types", None) is not None:
        text.layer_types = ["full_attention"] * text.num_hidden_layers
    if "rope_parameters" not in preset.text:  # scaled-down preset: mRoPE sections must cover head_dim / 2
        for rope in (getattr(text, "rope_parameters", None), getattr(text, "rope_scaling", None)):
            if isinstance(rope, dict) and "mrope_section" in rope:
                rope["mrope_section"] = mrope_sections(text.hidden_size // text.num_attention_heads)
    return config


def teacher_config(preset: Preset, tiny_teacher: Path) -> Any:
    """The tiny DINOv2 config with the preset's teacher dimensions."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_teacher)
    for key, value in preset.teacher.items():
        setattr(config, key, value)
    return config


def model_class(config: Any) -> type:
    """The ``*ForConditionalGeneration`` class of an MLLM config."""
    import transformers

    return getattr(transformers, config.architectures[0])


def count_parameters(preset: Preset, tiny_model: Path, tiny_teacher: Path) -> tuple[int, int]:
    """(MLLM, teacher) parameter counts of the preset, from meta-device instances (no memory, seconds)."""
    import torch  # here and below: a benchmark's parent process reading built assets never imports torch (~3 CPU s)
    from transformers import AutoModel

    config = model_config(preset, tiny_model)
    with torch.device("meta"):
        model = model_class(config)(config)
        teacher = AutoModel.from_config(teacher_config(preset, tiny_teacher))
    return sum(p.numel() for p in model.parameters()), sum(p.numel() for p in teacher.parameters())


def _save_random(build: Any, out_dir: Path, dtype: torch.dtype, seed: int, device: str) -> None:
    """Instantiate ``build()`` with random weights in ``dtype`` on ``device`` and save it (5 GB shards)."""
    import torch
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = build()
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(out_dir, max_shard_size="5GB")
    del model
    if device != "cpu":
        torch.cuda.empty_cache()


def build_bench_assets(root: Path, num_images: int = 64, seed: int = 0,
                       preset: str | Preset = "cpu-mid") -> BenchAssets:
    """Build (or reuse) the benchmark assets of ``preset`` under ``root``.

    The real-size presets draw their weights on the GPU when one is visible (seconds instead of minutes)
    and take ~17 GB of disk in bf16.
    """
    spec = preset if isinstance(preset, Preset) else PRESETS.get(preset)
    if spec is None:
        raise ValueError(f"--preset: unknown preset '{preset}'; choose one of {', '.join(PRESETS)}")
    tiny = build_tiny_assets(root / f"tiny_{num_images}", seed=seed, num_images=num_images, models=(spec.family,))
    source = tiny.models[spec.family]
    model_dir, teacher_dir = root / f"{spec.name}_model", root / f"{spec.name}_teacher"
    stamp = root / f"{spec.name}_stamp.json"
    wanted = {"preset": asdict(spec), "seed": seed}  # weights do not depend on the dataset size
    if not (stamp.is_file() and json.loads(stamp.read_text()) == wanted):
        import torch
        from transformers import AutoModel

        stamp.unlink(missing_ok=True)
        for folder in (model_dir, teacher_dir):
            shutil.rmtree(folder, ignore_errors=True)
        dtype = getattr(torch, spec.dtype)
        device = "cuda" if spec.dtype != "float32" and torch.cuda.is_available() else "cpu"
        config = model_config(spec, source)
        config.dtype = spec.dtype
        _save_random(lambda: model_class(config)(config), model_dir, dtype, seed, device)
        t_config = teacher_config(spec, tiny.teacher)
        t_config.dtype = spec.dtype
        _save_random(lambda: AutoModel.from_config(t_config), teacher_dir, dtype, seed + 1, device)
        processor = json.loads((tiny.teacher / "preprocessor_config.json").read_text())
        processor.update(spec.teacher_processor)
        (teacher_dir / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
        stamp.write_text(json.dumps(wanted))
    # Tokenizer, chat template and processor come from the tiny build of this dataset (cheap to copy).
    for file in source.iterdir():
        if file.name not in {"config.json", "model.safetensors", "generation_config.json"}:
            shutil.copy(file, model_dir / file.name)
    if spec.image_side:
        _fix_image_area(model_dir, spec.image_side)
    return BenchAssets(model_dir, teacher_dir, tiny.dataset_dir, tiny.templates[spec.family], spec)


def _fix_image_area(model_dir: Path, side: int) -> None:
    """Make the Qwen image processor resize every image to ``side x side`` pixels (min = max area)."""
    path = model_dir / "processor_config.json"
    config = json.loads(path.read_text())
    for key in ("image_processor", "video_processor"):
        if key in config:
            config[key]["size"] = {"shortest_edge": side * side, "longest_edge": side * side}
    path.write_text(json.dumps(config, indent=2))
