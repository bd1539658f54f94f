"""RAH-LoRA in the checkpoint's dtype (bf16 as GPU recipes run it; LLaMA-Factory loads a model in the dtype of its
checkpoint): the adapter, loaded as LLaMA-Factory loads it (base + adapter merged in the model's dtype), is the
model the trust region accepted, and a step that rounds to no change in that dtype is not counted as calibrated."""

from __future__ import annotations

import shutil
import statistics
from pathlib import Path
from typing import Any

import pytest
import torch

from llamafactory_hera.demo.rah import build_rah_recipe

SMALL = {"rah_samples": 6, "rah_probe_samples": 3, "rah_kl_samples": 2}


def _checkpoint(assets, family: str, dtype: torch.dtype, folder: Path) -> Path:
    """A copy of the tiny model saved in ``dtype`` (a bf16 checkpoint loads in bf16, as Qwen2.5-VL's does)."""
    from transformers import AutoModelForImageTextToText

    shutil.copytree(assets.models[family], folder)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    AutoModelForImageTextToText.from_pretrained(assets.models[family], torch_dtype=dtype).save_pretrained(folder)
    return folder


def _load(recipe: dict[str, Any], adapter: Path | None = None) -> tuple[Any, list[dict[str, Any]]]:
    """The model as LLaMA-Factory loads it for chat / export (adapters merged) and 4 probe batches."""
    from llamafactory_hera_patches.tools.model_data import (
        load_model_for_scoring,
        multimodal_dataset_and_collator,
        parse_recipe,
    )

    keys = {k: v for k, v in recipe.items() if not k.startswith("rah_")} | {"stage": "sft", "flash_attn": "disabled"}
    if adapter is not None:
        keys["adapter_name_or_path"] = str(adapter)
    args = parse_recipe(keys)
    model, tokenizer_module, template = load_model_for_scoring(args, "cpu")
    dataset, collator = multimodal_dataset_and_collator(args, model, tokenizer_module, template, 0, list(range(4)))
    return model, [collator([dataset[i]]) for i in range(4)]


def _log_probs(model: Any, batches: list[dict[str, Any]]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(**{k: v for k, v in b.items() if k != "labels"}, use_cache=False).logits[0].float()
                          for b in batches]).log_softmax(-1)


def _kl(p: torch.Tensor, q: torch.Tensor) -> float:
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.mark.parametrize("dtype,tolerance", [(torch.bfloat16, 1e-6), (torch.float32, 1e-5)], ids=["bf16", "fp32"])
def test_the_adapter_merged_as_llamafactory_loads_it_is_the_accepted_model(assets, tmp_path: Path, monkeypatch,
                                                                           dtype: torch.dtype,
                                                                           tolerance: float) -> None:
    """``stage: rah`` (``bf16: true`` on a bf16 checkpoint, or fp32) through ``run_exp``; the calibrated model is
    caught where the stage hands it to ``save_adapter``. Loaded as LLaMA-Factory loads the adapter (PEFT merges
    ``B @ A`` in float32 and rounds once to the model's dtype), base + adapter has the accepted weights, so the mean
    KL on the probe is within ``tolerance`` (bit-equal weights give 0; the tolerance is for the unlikely case of a
    different float32 summation order in PEFT's product, a 1-ulp flip of a few weights: 1e-6 in bf16, 5e4 below the
    trust region's delta and below the 3e-7 of the adapter applied unmerged; 1e-5 in fp32). The adapter's exact
    step and the accepted (rounded) step differ in bf16."""
    from llamafactory.train.tuner import run_exp
    from peft import PeftModel

    import llamafactory_hera.rah.adapter as adapter_module
    import llamafactory_hera.rah.workflow as workflow_module

    model_dir = _checkpoint(assets, "llava", dtype, tmp_path / "model")
    out = tmp_path / "out"
    recipe = {**build_rah_recipe(assets, "llava", out), **SMALL, "model_name_or_path": str(model_dir),
              "bf16": dtype == torch.bfloat16, "use_cpu": True}  # transformers refuses bf16 on a CPU otherwise
    caught: dict[str, Any] = {}
    save = adapter_module.save_adapter

    def spy(model: Any, factors: Any, *args: Any, **kwargs: Any) -> Any:
        caught["weights"] = {name: p.detach().clone() for name, p in model.named_parameters()}
        caught["factors"] = {name: (a.clone(), b.clone()) for name, (a, b) in factors.items()}
        return save(model, factors, *args, **kwargs)

    monkeypatch.setattr(workflow_module, "save_adapter", spy)  # where the stage calls it
    run_exp(recipe)
    accepted = caught["weights"]
    assert {p.dtype for p in accepted.values()} == {dtype}
    base, batches = _load(recipe)
    original = {name: p.detach().clone() for name, p in base.named_parameters()}
    merged, _ = _load(recipe, out)  # LLaMA-Factory merges every adapter it loads for chat / export
    weights = dict(merged.named_parameters())
    differing = {name: int((weights[name] != accepted[name]).sum()) for name in accepted
                 if not torch.equal(weights[name], accepted[name])}
    exact, rounded = [], []  # relative difference to the accepted step of the exact step and the merged one
    for name, (a, b) in caught["factors"].items():
        step = accepted[name + ".weight"].float() - original[name + ".weight"].float()
        exact.append(float(((b @ a) - step).norm() / step.norm()))
        rounded.append(float((weights[name + ".weight"].float() - original[name + ".weight"].float() - step).norm()
                             / step.norm()))
    accepted_model = base
    accepted_model.load_state_dict(accepted, strict=False)
    reference = _log_probs(accepted_model, batches)
    kl_merged = _kl(reference, _log_probs(merged, batches))
    accepted_model.load_state_dict(original, strict=False)
    unmerged = PeftModel.from_pretrained(accepted_model, str(out)).eval()  # the exact step, applied unrounded
    kl_unmerged = _kl(reference, _log_probs(unmerged, batches))
    print(f"{dtype}: exact step vs accepted step, relative: median {statistics.median(exact):.3g}, max "
          f"{max(exact):.3g}; merged step vs accepted: max {max(rounded):.3g}; weights differing: {differing}; "
          f"KL(accepted || merged) {kl_merged:.3g}; KL(accepted || adapter unmerged) {kl_unmerged:.3g}")
    assert kl_merged <= tolerance
    assert not differing and max(rounded) == 0.0  # bit for bit: the trust region applied the adapter's own B @ A
    if dtype == torch.bfloat16:
        assert statistics.median(exact) > 1e-3  # the rounding the adapter's exact step does not have


def test_a_step_that_rounds_to_no_change_is_not_calibrated(assets, tmp_path: Path) -> None:
    """bf16 weights with a step far below their rounding (alpha 1e-20): the trust region accepts (the KL is 0), but
    nothing moved, so each such head's outcome is "unchanged", never "calibrated", and no adapter is made."""
    from llamafactory.model import load_tokenizer
    from test_rah_model import FORCED

    from llamafactory_hera.rah.adapter import lora_factors
    from llamafactory_hera.rah.calibrate import calibrate
    from llamafactory_hera.rah.config import RahArguments
    from llamafactory_hera.rah.plan import plan_calibration
    from llamafactory_hera.rah.probe import token_kinds
    from llamafactory_hera.rah.workflow import profile_record
    from llamafactory_hera_patches.tools.model_data import parse_recipe

    model_dir = _checkpoint(assets, "llava", torch.bfloat16, tmp_path / "model")
    recipe = {**build_rah_recipe(assets, "llava", tmp_path / "out"), "model_name_or_path": str(model_dir)}
    model, batches = _load(recipe)
    tokenizer_module = load_tokenizer(parse_recipe({**recipe, "stage": "sft"}).model_args)
    kinds = token_kinds(model, tokenizer_module["tokenizer"], tokenizer_module.get("processor"))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    settings = RahArguments(rah_layers=[0, 1], rah_delta=10.0, rah_alpha_max=1e-20, **FORCED)
    calibration = calibrate(model, batches[:3], batches[:2], batches[2:4], settings, kinds)
    scored = [u for u in calibration.updates if u.region is not None]
    assert scored and all(u.region.alpha == 1e-20 and u.unchanged and not u.calibrated for u in scored)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert lora_factors(calibration, model, plan_calibration(model).geometry) == {}
    summary = profile_record(calibration, settings, {}, {}, {})
    assert {t["outcome"] for t in summary["targets"]} == {"unchanged"}
    assert summary["summary"]["calibrated"] == 0 and summary["summary"]["unchanged_in_model_dtype"] == len(scored)
