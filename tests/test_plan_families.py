"""``llamafactory-hera plan`` beyond the Qwen-VL families: each family's decoder layer and image against hand
arithmetic on a tiny config, HARC's micro-batch as the sum of its passes, RAH-LoRA's calibration plan, and a report
for every shipped recipe from its model's published config (tests/plan_configs.py; no network). In process."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from transformers import AutoConfig

from conftest import REPO
from llamafactory_hera.cli import main
from llamafactory_hera.plan import count, families, step

sys.path.insert(0, str(Path(__file__).parent))
from plan_configs import CONFIGS, hub_cache  # noqa: E402

D, INTER, HEADS, KV, HEAD_DIM, VOCAB, RANK, SEQ = 64, 128, 4, 2, 16, 512, 2, 16
TEXT = {"hidden_size": D, "intermediate_size": INTER, "num_attention_heads": HEADS, "num_key_value_heads": KV,
        "head_dim": HEAD_DIM, "vocab_size": VOCAB, "num_hidden_layers": 2}
TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
CLIP = {**TOWER, "model_type": "clip_vision_model", "image_size": 28, "patch_size": 14}
QWEN_TOWER = {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": D}
MROPE = {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}}
TINY = {  # a text Llama's layer: LLaVA-NeXT's
    "llava_next": lambda: AutoConfig.for_model(
        "llava_next", text_config={**TEXT, "model_type": "llama"}, vision_config=CLIP, image_token_index=VOCAB - 1,
        image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]]),
    "internvl": lambda: AutoConfig.for_model(
        "internvl", text_config={**TEXT, "model_type": "qwen2"}, image_token_id=VOCAB - 1,
        vision_config={**TOWER, "image_size": [28, 28], "patch_size": [14, 14]}),
    "gemma3": lambda: AutoConfig.for_model(
        "gemma3", text_config={**TEXT, "sliding_window": 8, "layer_types": ["sliding_attention"] * 2},
        vision_config={**TOWER, "image_size": 28, "patch_size": 14}, mm_tokens_per_image=4,
        image_token_index=VOCAB - 1),
    "qwen3_5": lambda: AutoConfig.for_model(
        "qwen3_5", text_config={**TEXT, "layer_types": ["full_attention"] * 2, "linear_num_key_heads": 2,
                                "linear_num_value_heads": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16},
        vision_config={**QWEN_TOWER, "patch_size": 16, "num_position_embeddings": 16}, image_token_id=VOCAB - 1),
    "qwen2_5_vl": lambda: AutoConfig.for_model(
        "qwen2_5_vl", text_config={**TEXT, **MROPE}, image_token_id=VOCAB - 1,
        vision_config={**QWEN_TOWER, "patch_size": 14, "window_size": 28, "fullatt_block_indexes": [0]}),
}
# a decoder layer's weights: q, k, v, o and the gated MLP; its norms; its LoRA adapters (every linear layer)
WEIGHTS = 2 * D * HEADS * HEAD_DIM + 2 * D * KV * HEAD_DIM + 3 * D * INTER
NORMS = 2 * D
LORA = RANK * (2 * (D + HEADS * HEAD_DIM) + 2 * (D + KV * HEAD_DIM) + 2 * (D + INTER) + (INTER + D))
# family -> (weights, other parameters, LoRA parameters) a layer adds beyond those
BIASES = HEADS * HEAD_DIM + 2 * KV * HEAD_DIM  # Qwen2's q, k, v
EXTRA = {"llava_next": (0, 0, 0), "internvl": (0, BIASES, 0), "qwen2_5_vl": (0, BIASES, 0),
         "gemma3": (0, 2 * D + 2 * HEAD_DIM, 0),  # pre / post feed-forward norms, q / k norms
         "qwen3_5": (D * HEADS * HEAD_DIM, 2 * HEAD_DIM, RANK * HEADS * HEAD_DIM)}  # gated attention: q_proj x 2
# each family's image on a 28 x 28 image: (its tokens, its pixel_values per row)
IMAGES = {"llava_next": (2 * 2 + 2 + 2 * 2, (1, 3, 3, 28, 28)),  # base 2x2 + unpadded 2x2 + 2 newlines; 2 tiles + base
          "internvl": (1, (1, 3, 28, 28)), "gemma3": (4, (1, 3, 28, 28)),
          "qwen3_5": (1, (4, 3 * 2 * 16 * 16)), "qwen2_5_vl": (1, (4, 3 * 2 * 14 * 14))}


@pytest.mark.parametrize("family", list(TINY))
def test_a_decoder_layer_and_an_image_by_hand(family: str) -> None:
    """One LoRA micro-step (1 row of 16 tokens, a 28 px image, reentrant checkpointing) with one decoder layer and
    with two: the second layer adds its weights, norms and adapters, one bf16 hidden state [1, 16, 64] kept for
    backward, and FLOPs: its linear layers 3 x forward (forward, recomputation, input gradient), its adapters 4 x
    (forward, recomputation, input and weight gradients), its attention 4.5 x forward ``4 b h s s d`` (forward,
    recomputation, backward 2.5 x: torch's formula)."""
    config = TINY[family]()
    image = families.images(config, 28 * 28)
    if family in IMAGES:
        assert (image.tokens, image.pixels) == IMAGES[family]
    shape = count.Shape(1, SEQ, 28 * 28, RANK, 4, False, True)
    kind = count.layer_types(config)[0]
    one, two = (count.count(count.reduced(config, [kind] * n, 1), shape) for n in (1, 2))
    weights, other, lora = (a + b for a, b in zip((WEIGHTS, NORMS, LORA), EXTRA[family], strict=True))
    assert two["params"] - one["params"] == weights + other + lora
    assert two["trainable"] - one["trainable"] == lora
    assert two["activations"] - one["activations"] == SEQ * D * 2
    attention = 4 * HEADS * SEQ * SEQ * HEAD_DIM
    assert two["flops"] - one["flops"] == 3 * 2 * SEQ * weights + 4 * 2 * SEQ * lora + 4.5 * attention
    assert two["attention"] - one["attention"] == 4.5 * attention


def test_images_of_the_published_configs() -> None:
    """Each family's image at its recipe's image_max_pixels, by hand: LLaVA-1.5 576 (24 x 24 patches, [CLS] dropped),
    LLaVA-NeXT at 336 px 1,176 (base 576 + the 672 x 336 grid unpadded to 24 x 24 + 24 newlines), InternVL one
    448 px tile of 32 x 32 patches merged 2 x 2 (crop_to_patches: false), Gemma 3 256, Qwen at 512 / 448 px 256."""
    def at(name: str, pixels: int) -> families.Images:
        return families.images(AutoConfig.for_model(**CONFIGS[name]), pixels)

    assert at("llava-hf/llava-1.5-7b-hf", 336 * 336).tokens == 576
    assert (at("llava-hf/llama3-llava-next-8b-hf", 336 * 336).tokens, at("llava-hf/llama3-llava-next-8b-hf", 336 * 336)
            .pixels) == (576 + 576 + 24, (1, 3, 3, 336, 336))
    assert at("OpenGVLab/InternVL3_5-8B-HF", 768 * 768) == families.Images(256, (1, 3, 448, 448), {})
    assert at("google/gemma-3-12b-it", 768 * 768).tokens == 256
    assert at("Qwen/Qwen3-VL-8B-Instruct", 512 * 512).tokens == 256
    assert at("Qwen/Qwen2.5-VL-72B-Instruct", 448 * 448).tokens == 256
    assert at("Qwen/Qwen3.5-9B", 512 * 512).inputs == {"image_grid_thw": [1, 32, 32]}


def _recipe(tmp_path: Path, config, **keys) -> Path:
    config.save_pretrained(tmp_path / "model")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"model_name_or_path": str(tmp_path / "model"), "finetuning_type": "lora",
                                    "cutoff_len": SEQ, **keys}))
    return path


def test_harc_micro_batch_is_the_sum_of_its_passes(tmp_path, capsys) -> None:
    """HARC on a 1-layer Llama, 1 harmful + 1 harmless + 1 pseudo row of 16 tokens: its FLOPs are the forward and
    backward over the 3 rows plus the KL reference: a forward over the 2 retain rows with the adapters off, by hand
    (linear layers and output layer 2 x tokens x weights, attention ``4 b h s s d``, the rotary angles' product)."""
    config = AutoConfig.for_model("llama", **{**TEXT, "num_hidden_layers": 1})
    recipe = _recipe(tmp_path, config, stage="harc", lora_rank=RANK, lora_alpha=4, harc_batch_harmful=1,
                     harc_batch_harmless=1, harc_batch_pseudo=1, harc_max_length=SEQ, max_steps=10,
                     harc_refresh_steps=5, harc_harmful_completions="x", harc_extract_samples=3,
                     harc_harmful="harmful", harc_harmless="harmless",
                     harc_pseudo="pseudo")  # the names training requires (their rows are not read by plan)
    assert main(["plan", str(recipe)]) == 0
    out = capsys.readouterr().out
    rotary = 2 * HEAD_DIM // 2 * SEQ  # the rotary angles: [1, d / 2, 1] x [1, 1, s] (positions shared by the rows)
    reference = 2 * 2 * SEQ * (WEIGHTS + D * VOCAB) + 4 * 2 * HEADS * SEQ * SEQ * HEAD_DIM + rotary
    shape = count.Shape(3, SEQ, 0, RANK, 4, False, True, reference_rows=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        harc, grad_pass = (count.count(count.reduced(config, ["layer"], 0), s) for s in
                           (shape, count.Shape(**{**shape.__dict__, "reference_rows": 0})))
    assert harc["reference"] == reference
    assert harc["flops"] == grad_pass["flops"] + reference
    per_row = grad_pass["flops"] / 3 / 1e12
    assert f"= forward + backward harmful {per_row:.2f}, harmless {per_row:.2f}, pseudo {per_row:.2f} + KL " \
           f"reference forward (retain rows, no grad) {reference / 1e12:.2f}" in out
    assert "micro-batch of 1 harmful + 1 harmless + 1 pseudo rows of 16 tokens" in out and "DDP" in out
    assert "directions: 15 rows forward (5 row sets), 2 times (start + refreshes)" in out  # steps 1 and 6
    assert "fits:" in out and " (79.65 GiB)\n" in out and " GB)" not in out  # one unit: GiB, as HeRA's report
    # two composed micro-batches a device step (per_device_train_batch_size: 2): twice the rows, as training takes
    assert main(["plan", str(recipe), "per_device_train_batch_size=2"]) == 0
    out = capsys.readouterr().out
    assert "micro-batch of 2 harmful + 2 harmless + 2 pseudo rows of 16 tokens" in out


def test_rah_plans_its_calibration(tmp_path, capsys) -> None:
    """RAH-LoRA on a tiny LLaVA-NeXT: no optimizer; the model whole on one GPU, its I-SAL, CAF and KL passes."""
    config = TINY["llava_next"]()
    config.text_config.num_hidden_layers = 1
    recipe = _recipe(tmp_path, config, stage="rah", image_max_pixels=28 * 28, rah_samples=10, rah_batch_size=2,
                     rah_probe_samples=4, rah_kl_samples=3, rah_halvings=2)
    assert main(["plan", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "stage rah (training-free: calibration passes, no optimizer), bf16" in out
    assert " (79.65 GiB)\n" in out and " GB)" not in out
    assert "loads whole on one GPU" in out and "ISAL" in out and "CAF" in out
    assert "I-SAL: 10 rows forward" in out and "CAF: 4 rows forward + backward" in out
    assert "each target head: 1-3 forwards of 3 rows" in out


def test_plan_reports_every_shipped_recipe(tmp_path, monkeypatch, capsys) -> None:
    """Every recipe under recipes/, its model's published config.json from a local Hub cache (a LLaVA-1.5 two-stage
    recipe's from the LLM and vision tower its compose command names): the report names its engine and whether it
    fits. The step's count is stubbed (a count of each takes minutes on 2 cores; the counts are tested above): the
    recipe's batch is still made from its model's config."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache(tmp_path / "hub")))
    monkeypatch.chdir(REPO)

    def stub(config, shape: count.Shape) -> dict[str, float]:
        step.batch(config, 1, shape.seq, shape.max_pixels)
        return dict.fromkeys(count.FIGURES, 1e9) | {"trainable": 1e6 if shape.lora_rank else 1e9, "params": 1e10}

    monkeypatch.setattr(count, "count", stub)
    recipes = sorted((REPO / "recipes").glob("*.yaml")) + sorted((REPO / "recipes" / "llava15").glob("*.yaml"))
    assert len(recipes) > 40
    for path in recipes:
        recipe = yaml.safe_load(path.read_text())
        assert main(["plan", str(path.relative_to(REPO))]) == 0, path
        out = capsys.readouterr().out
        engine = "DeepSpeed ZeRO-3" if recipe.get("deepspeed") else "bf16" if recipe["stage"] == "rah" else "DDP"
        assert engine in out and ("fits:" in out or "does NOT fit" in out or "loads " in out), (path, out)


def test_plan_refuses_heads_outside_a_hub_models_config(tmp_path, monkeypatch, capsys) -> None:
    """Named heads outside a Hub model (Qwen2.5-VL-3B: 36 layers x 16 heads, its config from the local cache) are
    refused by training's own check of heads against the config, before any count; ``auto`` asking for more heads
    than the model has, likewise."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache(tmp_path / "hub")))
    monkeypatch.chdir(REPO)
    recipe = "recipes/qwen2_5_3b_hera.yaml"
    assert main(["plan", recipe, "hera_heads=[L40H20]"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "hera_heads: L40H20 is outside Qwen/Qwen2.5-VL-3B-Instruct, which has layers L0..L35 and heads H0..H15 per "
        "layer (zero-based). Fix or remove L40H20.")
    assert main(["plan", recipe, "hera_heads=auto", "hera_select_num_heads=600"]) == 2
    assert "hera_select_num_heads: got 600; allowed range is 1..576" in capsys.readouterr().err


def test_auto_may_ask_for_every_head_of_the_model(tmp_path) -> None:
    """``hera_select_num_heads`` up to the model's heads passes training's check of ``auto`` (Qwen2.5-VL-3B: 36 layers
    x 16 heads, 576), one more is refused naming that range."""
    from llamafactory_hera.hera.config import parse_hera_arguments
    from llamafactory_hera.hera.parsed_checks import check_heads_of
    from llamafactory_hera.runtime.errors import RecipeError

    name = "Qwen/Qwen2.5-VL-3B-Instruct"
    (tmp_path / "config.json").write_text(json.dumps(CONFIGS[name]))
    config = AutoConfig.from_pretrained(tmp_path)
    every = parse_hera_arguments({"hera_heads": "auto", "hera_select_num_heads": 576})
    assert check_heads_of(every, config, name).num_model_heads == 576
    with pytest.raises(RecipeError, match=r"hera_select_num_heads: got 577; allowed range is 1\.\.576 "):
        check_heads_of(parse_hera_arguments({"hera_heads": "auto", "hera_select_num_heads": 577}), config, name)
