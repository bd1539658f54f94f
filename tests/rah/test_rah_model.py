"""RAH-LoRA on tiny random LLaVA (MHA) and Qwen2.5-VL (GQA) loaded by LLaMA-Factory: the gate gradient, the
calibration in place, rollbacks, and the PEFT adapter that reproduces the calibrated model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import REPO, base_recipe
from llamafactory_hera.rah.adapter import lora_factors, save_adapter
from llamafactory_hera.rah.calibrate import calibrate, o_columns, v_rows
from llamafactory_hera.rah.config import RahArguments
from llamafactory_hera.rah.plan import plan_calibration
from llamafactory_hera.rah.probe import attention_modules, gate_gradients, token_kinds, token_masks
from llamafactory_hera.rah.scores import margin_loss
from llamafactory_hera_patches.tools.model_data import (
    load_model_for_scoring,
    multimodal_dataset_and_collator,
    parse_recipe,
)
from llamafactory_hera_testing.families import build_extra_families


@pytest.fixture(scope="module")
def extra_assets():
    """LLaVA-NeXT and both InternVL variants (built on request, shared with the HeRA recipe tests)."""
    return build_extra_families(REPO / ".hera_assets" / "extra_families", seed=0)


def _load(assets, family: str, tmp_path: Path, samples: int = 8, extra=None) -> tuple[Any, Any, list[dict[str, Any]]]:
    recipe = {k: v for k, v in base_recipe(assets, "llava", tmp_path / "unused").items() if not k.startswith("hera_")}
    source = extra if extra is not None and family in extra.models else assets
    recipe |= {"flash_attn": "disabled", "model_name_or_path": str(source.models[family]),
               "template": source.templates[family]}
    args = parse_recipe(recipe)
    torch.manual_seed(0)
    model, tokenizer_module, template = load_model_for_scoring(args, "cpu")
    model = model.float()
    dataset, collator = multimodal_dataset_and_collator(args, model, tokenizer_module, template, 0,
                                                        list(range(samples)))
    batches = [collator([dataset[i]]) for i in range(samples)]
    return model, token_kinds(model, tokenizer_module["tokenizer"], tokenizer_module.get("processor")), batches


def _logits(model: Any, batches: list[dict[str, Any]]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(**{k: v for k, v in b.items() if k != "labels"}, use_cache=False).logits for b in batches]


def test_gate_gradient_equals_a_finite_difference_of_the_margin_loss(assets, tmp_path: Path) -> None:
    """d L / d gamma_h at gamma = 1, against (L(1 + eps) - L(1 - eps)) / 2 eps where the gate is applied by scaling
    head h's columns of o_proj.weight (another path to the same function), in float64. eps is 1e-2 because eager
    attention keeps its softmax in float32 (noise ~1e-7 / eps); the central difference's own error is O(eps^2)."""
    model, kinds, batches = _load(assets, "llava", tmp_path, samples=1)
    model = model.double()
    batch = {k: v.double() if torch.is_floating_point(v) else v for k, v in batches[0].items()}
    geometry = plan_calibration(model).geometry
    grads = gate_gradients(model, batch, [0, 1], geometry.num_heads, geometry.head_dim, kinds)
    mask = token_masks(batch["input_ids"], batch["attention_mask"], kinds)[2]
    modules = attention_modules(model)
    eps = 1e-2
    for layer in (0, 1):
        for head in range(geometry.num_heads):
            weight = modules[layer].output.weight
            columns = o_columns(head, geometry)
            original = weight.data[:, columns].clone()
            losses = []
            for sign in (1, -1):
                weight.data[:, columns] = original * (1 + sign * eps)
                losses.append(float(margin_loss(_logits(model, [batch])[0], mask)))
            weight.data[:, columns] = original
            finite = (losses[0] - losses[1]) / (2 * eps)
            assert float(grads[layer, head]) == pytest.approx(finite, rel=1e-3, abs=1e-6)


# settings that force targets and anchors on 4-head layers (the paper's percentiles keep 0 or 1 head there)
FORCED = {"rah_isal_percentile": 50.0, "rah_caf_percentile": 0.0, "rah_beta": -100.0, "rah_num_anchors": 2,
          "rah_rank": 2}


@pytest.mark.parametrize("family,modules", [("llava", ("v", "o")), ("qwen2_5_vl", ("o",)), ("qwen3_vl", ("o",)),
                                            ("llava_next", ("o",)), ("internvl", ("o",)), ("internvl_qwen3", ("o",))])
def test_the_adapter_reproduces_the_calibrated_model(assets, extra_assets, tmp_path: Path, family: str,
                                                     modules) -> None:
    """Every model type the HeRA recipes use: LLaVA is MHA (V and O), the others GQA (O only by default)."""
    from peft import PeftModel

    model, kinds, batches = _load(assets, family, tmp_path, extra=extra_assets)
    before = [w.clone() for w in (m.value.weight for m in attention_modules(model).values())]
    settings = RahArguments(rah_layers=[0, 1], rah_delta=10.0, **FORCED)
    calibration = calibrate(model, batches[:4], batches[:3], batches[4:6], settings, kinds)
    kept = [u for u in calibration.updates if u.region is not None and not u.region.rolled_back]
    assert calibration.modules == modules and kept and all(u.region.alpha == 0.15 for u in kept)
    calibrated = _logits(model, batches)
    factors = lora_factors(calibration, model, plan_calibration(model).geometry)
    names = save_adapter(model, factors, tmp_path / "adapter")
    assert all(".language_model." in n and n.rsplit(".", 1)[1] in {f"{m}_proj" for m in modules} for n in names)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == names and config["lora_dropout"] == 0.0
    assert all(config["alpha_pattern"][n] == config["rank_pattern"][n] for n in names)  # scaling 1
    if modules == ("o",):
        after = [m.value.weight for m in attention_modules(model).values()]
        assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))  # GQA: V untouched
    base, _, _ = _load(assets, family, tmp_path, extra=extra_assets)
    with_adapter = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    for ours, theirs in zip(calibrated, _logits(with_adapter, batches), strict=True):
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_rollbacks_leave_every_head_bit_identical(assets, tmp_path: Path) -> None:
    model, kinds, batches = _load(assets, "llava", tmp_path)
    saved = {name: p.detach().clone() for name, p in model.named_parameters()}
    settings = RahArguments(rah_layers=[0, 1], rah_delta=-1.0, rah_halvings=2, **FORCED)  # no alpha can fit
    calibration = calibrate(model, batches[:4], batches[:2], batches[4:6], settings, kinds)
    assert calibration.updates and all(u.region.rolled_back for u in calibration.updates if u.anchors)
    assert all(len(u.region.tried) == 3 for u in calibration.updates if u.anchors)
    assert all(torch.equal(p, saved[name]) for name, p in model.named_parameters())
    assert calibration.kl_to_original == 0.0
    with pytest.raises(ValueError, match="no adapter to write"):
        save_adapter(model, lora_factors(calibration, model, plan_calibration(model).geometry), tmp_path / "none")


def test_trust_region_on_the_model_keeps_kl_within_delta(assets, tmp_path: Path) -> None:
    model, kinds, batches = _load(assets, "llava", tmp_path)
    first = RahArguments(rah_layers=[0, 1], rah_delta=10.0, **FORCED)
    loose = calibrate(model, batches[:4], batches[:2], batches[4:6], first, kinds)
    kls = [kl for u in loose.updates if u.region for _, kl in u.region.tried]
    model, kinds, batches = _load(assets, "llava", tmp_path)
    delta = sorted(kls)[len(kls) // 2] / 4 if kls else 1e-4  # tight enough that some heads halve or roll back
    tight = calibrate(model, batches[:4], batches[:2], batches[4:6], RahArguments(rah_layers=[0, 1], rah_delta=delta,
                                                                                 **FORCED), kinds)
    regions = [u.region for u in tight.updates if u.region is not None]
    assert any(r.alpha < 0.15 for r in regions) and len(regions) >= 2  # the search halved somewhere
    for update in tight.updates:
        region = update.region
        if region is None or region.rolled_back:
            continue
        assert region.kl <= delta
        assert region.alpha == 0.15 or dict(region.tried)[2 * region.alpha] > delta
    geometry = plan_calibration(model).geometry
    assert (v_rows(3, geometry), o_columns(3, geometry)) == (slice(48, 64), slice(48, 64))  # MHA, d_head 16
