"""RAH-LoRA on tiny models that have the properties real runs have: a template without BOS (LLaMA-Factory's
``llava`` and ``qwen2_vl``), GQA (heads of one KV group share their V rows) and images of several sizes (Qwen's
dynamic resolution). Each test checks against a loop over tokens, heads or rows, not another project function."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import base_recipe, mixed_size_dataset
from llamafactory_hera.rah.calibrate import calibrate
from llamafactory_hera.rah.config import RahArguments
from llamafactory_hera.rah.probe import AttentionProfile, profile_attention, token_kinds, token_masks
from llamafactory_hera.rah.workflow import profile_record
from llamafactory_hera_patches.tools.model_data import (
    load_model_for_scoring,
    multimodal_dataset_and_collator,
    parse_recipe,
)


def _load(assets, family: str, tmp_path: Path, rows: int, **overrides: Any) -> tuple[Any, Any, Any, list]:
    """(model in float32, tokenizer, token kinds, one collated batch per row) as LLaMA-Factory loads them."""
    recipe = {k: v for k, v in base_recipe(assets, "llava", tmp_path / "unused").items() if not k.startswith("hera_")}
    recipe |= {"flash_attn": "disabled", "model_name_or_path": str(assets.models[family]),
               "template": assets.templates[family], **overrides}
    args = parse_recipe(recipe)
    model, tokenizer_module, template = load_model_for_scoring(args, "cpu")
    model = model.float()
    dataset, collator = multimodal_dataset_and_collator(args, model, tokenizer_module, template, 0, list(range(rows)))
    tokenizer = tokenizer_module["tokenizer"]
    kinds = token_kinds(model, tokenizer, tokenizer_module.get("processor"))
    return model, tokenizer, kinds, [collator([dataset[i]]) for i in range(rows)]


def _cos(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_the_attention_sink_is_left_out_of_the_text_under_a_template_without_bos(assets, tmp_path: Path,
                                                                                 family: str) -> None:
    """Neither template adds BOS, so the sink is the first system token: it is not text, wherever padding puts it."""
    _, tokenizer, kinds, batches = _load(assets, family, tmp_path, rows=4)
    for batch in batches:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        assert tokenizer.bos_token_id is None or int(ids[0, 0]) != tokenizer.bos_token_id  # the fixture's property
        _, text, _ = token_masks(ids, mask, kinds)
        assert not bool(text[0, 0]) and bool(text[0, 1])
        left = torch.cat([torch.zeros(1, 3, dtype=ids.dtype), ids], dim=1)  # left padding: the sink moves
        _, text, _ = token_masks(left, torch.cat([torch.zeros(1, 3, dtype=mask.dtype), mask], dim=1), kinds)
        assert not bool(text[0, 3]) and bool(text[0, 4]) and not bool(text[0, :3].any())


def test_isal_leaves_the_first_token_out_under_the_llava_template(assets, tmp_path: Path) -> None:
    """I-SAL of every head against a loop over (query, key) pairs whose text is every non-image token but the first."""
    model, tokenizer, kinds, batches = _load(assets, "llava", tmp_path, rows=3)
    image_id = model.config.image_token_index
    for batch in batches:
        profile = AttentionProfile([0, 1])
        profile_attention(model, batch, [0, 1], kinds, profile)
        with torch.no_grad():
            attentions = model(**{k: v for k, v in batch.items() if k != "labels"}, output_attentions=True,
                               use_cache=False).attentions
        ids, attended = batch["input_ids"][0].tolist(), batch["attention_mask"][0].tolist()
        image = [t == image_id for t in ids]
        text = [t != image_id and i > 0 and attended[i] == 1 for i, t in enumerate(ids)]
        for layer in (0, 1):
            a = attentions[layer][0].double().tolist()
            for head in range(4):
                t2i = [a[head][i][j] for i in range(len(ids)) for j in range(len(ids)) if text[i] and image[j]]
                i2t = [a[head][i][j] for i in range(len(ids)) for j in range(i + 1) if image[i] and text[j]]
                expected = (sum(t2i) / len(t2i) + sum(i2t) / len(i2t)) / 2
                assert float(profile.scores()[0, layer, head]) == pytest.approx(expected, rel=1e-5)


def test_maps_use_every_row_whatever_its_image_size(assets, tmp_path: Path) -> None:
    """Qwen2.5-VL on images of 4 sizes (16 rows of 2x2 merged patches, 8 of 3x3, 4 of 2x3, 4 of 3x2): the map
    cosine is, per layout, the cosine of the heads' mean maps (Eq. 10), averaged over layouts weighted by rows."""
    folder = mixed_size_dataset(assets, tmp_path / "data")
    model, tokenizer, kinds, batches = _load(assets, "qwen2_5_vl", tmp_path, rows=32, dataset_dir=str(folder))
    profile = AttentionProfile([0, 1])
    for batch in batches:
        profile_attention(model, batch, [0, 1], kinds, profile)
    assert (sum(profile.map_rows.values()), profile.map_skipped, len(profile.map_sums)) == (32, 0, 4)
    image_id, *others = tokenizer.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                         "<|vision_end|>"])
    groups: dict[tuple[int, ...], list[list[list[list[float]]]]] = {}  # grid -> rows -> layer -> head -> map
    for batch in batches:
        ids, attended = batch["input_ids"][0].tolist(), batch["attention_mask"][0].tolist()
        image = [j for j, t in enumerate(ids) if t == image_id]
        text = [i for i, t in enumerate(ids) if 0 < i and attended[i] == 1 and t != image_id and t not in others]
        with torch.no_grad():
            attentions = model(**{k: v for k, v in batch.items() if k != "labels"}, output_attentions=True,
                               use_cache=False).attentions
        weights = [attentions[layer][0].tolist() for layer in (0, 1)]  # [layer][head][query][key]
        row = [[[sum(weights[layer][head][i][j] for i in text) / len(text) for j in image]
                for head in range(4)] for layer in (0, 1)]
        groups.setdefault(tuple(batch["image_grid_thw"][0].tolist()), []).append(row)
    assert sorted(len(rows) for rows in groups.values()) == [4, 4, 8, 16]
    maps = profile.maps()
    for layer in (0, 1):
        for h in range(4):
            for a in range(4):
                expected = 0.0
                for rows in groups.values():
                    mean_h = [sum(r[layer][h][p] for r in rows) / len(rows) for p in range(len(rows[0][0][0]))]
                    mean_a = [sum(r[layer][a][p] for r in rows) / len(rows) for p in range(len(rows[0][0][0]))]
                    expected += len(rows) / 32 * _cos(mean_h, mean_a)
                got = float(torch.nn.functional.cosine_similarity(maps[layer, h], maps[layer, a], dim=0))
                assert got == pytest.approx(expected, rel=1e-4, abs=1e-6)


# targets forced on 4-head layers as in test_rah_model; beta is set per test
FORCED = {"rah_isal_percentile": 50.0, "rah_caf_percentile": 0.0, "rah_num_anchors": 2, "rah_rank": 2,
          "rah_delta": 10.0}


def test_a_layer_without_anchors_takes_them_from_the_adjacent_layer(assets, tmp_path: Path) -> None:
    """beta between the two layers' best non-target I-SAL: one layer has no anchor of its own. Its targets take the
    other layer's heads (distance 1), whose V rows and O columns the update moves towards (numpy SVD on a copy of the
    weights); with rah_adjacent_layers 0 they have none."""
    model, _, kinds, batches = _load(assets, "llava", tmp_path, rows=8)
    saved = {name: p.detach().clone() for name, p in model.named_parameters()}
    probe = calibrate(model, batches[:4], batches[:3], batches[4:6], RahArguments(rah_layers=[0, 1], rah_beta=-100.0,
                                                                                  **FORCED), kinds)
    targets = {layer: {u.head for u in probe.updates if u.layer == layer} for layer in (0, 1)}
    best = [max(float(probe.isal_std[layer, h]) for h in range(4) if h not in targets[layer]) for layer in (0, 1)]
    poor, rich = (0, 1) if best[0] < best[1] else (1, 0)
    beta = (best[0] + best[1]) / 2
    for name, p in model.named_parameters():
        p.data.copy_(saved[name])
    result = calibrate(model, batches[:4], batches[:3], batches[4:6], RahArguments(rah_layers=[0, 1], rah_beta=beta,
                                                                                   **FORCED), kinds)
    fallback = [u for u in result.updates if u.layer == poor]
    assert fallback and all(u.anchor_distance == 1 and {layer for layer, _, _ in u.anchors} == {rich}
                            for u in fallback)
    assert profile_record(result, RahArguments(rah_layers=[0, 1]), {}, {}, {})["summary"][
        "anchors_from_adjacent_layers"] == len(fallback)
    prefix, head_dim = "model.language_model.layers", 16
    assert any(u.calibrated for u in fallback)
    for update in fallback:
        if not update.calibrated:
            continue
        for kind, (u, s, vh) in update.factors.items():
            def piece(layer: int, head: int, kind: str = kind) -> np.ndarray:
                w = saved[f"{prefix}.{layer}.self_attn.{kind}_proj.weight"].double().numpy()
                return w[head * head_dim:(head + 1) * head_dim] if kind == "v" else \
                    w[:, head * head_dim:(head + 1) * head_dim]

            anchor = sum(piece(layer, head) for layer, head, _ in update.anchors) / len(update.anchors)
            ref_u, ref_s, ref_vh = np.linalg.svd(anchor - piece(update.layer, update.head), full_matrices=False)
            np.testing.assert_allclose(((u * s) @ vh).numpy(), (ref_u[:, :2] * ref_s[:2]) @ ref_vh[:2], atol=1e-5)
    for name, p in model.named_parameters():
        p.data.copy_(saved[name])
    alone = RahArguments(rah_layers=[0, 1], rah_beta=beta, rah_adjacent_layers=0, **FORCED)
    none = calibrate(model, batches[:4], batches[:3], batches[4:6], alone, kinds)
    assert all(u.region is None and not u.anchors for u in none.updates if u.layer == poor)
