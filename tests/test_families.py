"""Every image-text family LLaMA-Factory ships (docs/families.md's table): on a tiny model of each, the stock
path runs `llamafactory-hera select`, HeRA with `hera_heads: auto` (one step; the HeRA term's own gradient reaches the
chosen heads' layer) and RAH-LoRA (an adapter written; the layers it leaves out named).

The families of the fixtures and of the recipes (qwen3_vl, qwen2_5_vl, llava, llava_next, intern_vl) are trained by
their own tests (tests/hera/test_hera_recipes.py, tests/rah/test_rah_model.py); this module takes the rest, one
family per test so that pytest-xdist spreads them. The config's layer plan and the loaded modules agree on every
family (heads/architecture.py's two views).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForImageTextToText

from conftest import base_recipe, run_train, run_verb
from llamafactory_hera.fixtures import TinyAssets
from llamafactory_hera.heads.architecture import decoder_layers, head_projections, plan_layers
from llamafactory_hera.hera.trainer import HeraTrainer
from llamafactory_hera_patches.stacks import family_too_new
from llamafactory_hera_testing.zoo import ZOO

# what each family's layers are, as the docs' table says (the plan's kinds beyond plain softmax attention)
LAYER_MIX = {
    "qwen3_5": {"linear attention"}, "qwen3_5_moe": {"linear attention"}, "lfm2_vl": {"convolution"},
    "mllama": {"cross-attention"},
}
# RAH-LoRA: families with per-head V and O in every softmax layer calibrate every head layer's first half; these
# leave layers out, each named in the run's output
LEFT_OUT = {"qwen3_5": "linear attention, no heads", "qwen3_5_moe": "linear attention, no heads",
            "lfm2_vl": "convolution, no heads", "mllama": "cross-attention, no heads",
            "gemma3n": "reads the keys and values of", "gemma4": "reads the keys and values of"}
# lora_target: all fails in LLaMA-Factory 0.9.5 + PEFT for two families (tests/test_zoo_*_sft.py pin the host's error):
# ERNIE-4.5-VL (the resampler's Linear `mlp` also names the decoder's MLP blocks) and Gemma 3n (AltUp's Linear layers
# in ModuleLists are named "0", "1", ..., which match every decoder layer's path; `up_proj` matches
# `altup_projections`): the decoder's linear layers, as their users must write them
LORA_TARGET = {"ernie4_5_vl_moe": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
               "gemma3n": "q_proj,k_proj,v_proj,o_proj,gate_proj,down_proj"}
# the two tests below build Qwen3.5 (a hybrid model): skipped on a transformers without it (docs/families.md)
needs_qwen3_5 = pytest.mark.skipif(family_too_new("qwen3_5") is not None,
                                   reason=f"qwen3_5 needs transformers >= {family_too_new('qwen3_5')}")
RAH_FORCED = {"rah_isal_percentile": 50, "rah_caf_percentile": 0, "rah_beta": -100, "rah_num_anchors": 2,
              "rah_rank": 2, "rah_delta": 10.0}  # on 4-head tiny layers: targets, anchors and kept steps


class TermGradient:
    """Wraps :meth:`HeraTrainer.hera_term`: at the first term, the gradient of the HeRA term alone with respect to
    the trainable parameters of each chosen head's layer's ``o_proj`` (its summed absolute value per layer)."""

    def __init__(self) -> None:
        self.per_layer: dict[int, float] = {}
        self.original = HeraTrainer.hera_term

    def __call__(self, trainer: HeraTrainer, reps: torch.Tensor, *args: Any) -> Any:
        term, finite = self.original(trainer, reps, *args)
        if term is not None and not self.per_layer:
            o_projs = head_projections(trainer.model)
            layers = sorted({ref.layer for ref in trainer.hera_args.hera_heads})
            params = {layer: [p for p in o_projs[layer].parameters() if p.requires_grad] for layer in layers}
            # backward, not autograd.grad: the heads' layers keep reentrant checkpointing, whose recompute in
            # backward accumulates into .grad (what the optimizer reads); every gradient is put back as it was
            trainable = [p for p in trainer.model.parameters() if p.requires_grad] + [trainer.hera_log_tau]
            kept = [p.grad for p in trainable]
            for p in trainable:
                p.grad = None
            term.backward(retain_graph=True)
            for layer in layers:
                self.per_layer[layer] = sum(float(p.grad.abs().sum()) for p in params[layer] if p.grad is not None)
            for p, grad in zip(trainable, kept, strict=True):
                p.grad = grad
        return term, finite


def _family_assets(assets: TinyAssets, name: str, zoo: Callable[[str], Path]) -> TinyAssets:
    return dataclasses.replace(assets, models={name: zoo(name)}, templates={name: ZOO[name][0]})


@pytest.mark.parametrize("name", list(ZOO))
def test_family_runs_select_hera_and_rah(name: str, assets: TinyAssets, zoo: Callable[[str], Path], tmp_path: Path,
                                         capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    family = _family_assets(assets, name, zoo)
    model_path = family.models[name]

    # the two views of the architecture agree: the config's plan (before loading) and the loaded modules
    config = AutoConfig.from_pretrained(model_path)
    plans = plan_layers(config)
    with torch.device("meta"):
        loaded = decoder_layers(AutoModelForImageTextToText.from_config(config))
    assert [(p.index, p.kind, p.kv_source, p.head_dim) for p in plans] == \
        [(d.index, d.kind, d.kv_source, d.head_dim) for d in loaded]
    assert {str(p.kind) for p in plans} - {"softmax attention"} == LAYER_MIX.get(name, set())
    head_layers = [p.index for p in plans if p.has_heads]

    # select through the command line's entry (scores cached for the HeRA run below)
    hera = base_recipe(family, name, tmp_path / "hera", hera_heads="auto", hera_select_num_heads=2,
                       hera_select_samples=12, max_samples=16, per_device_train_batch_size=4, max_steps=1,
                       lora_target=LORA_TARGET.get(name, "all"), plot_loss=False, hera_monitor_steps=0)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(hera), encoding="utf-8")
    proc = run_verb(capfd, "select", recipe, "--dry-run", "--device", "cpu", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # HeRA, auto heads: the chosen heads lie in layers with heads and the term's gradient reaches their o_proj
    probe = TermGradient()
    monkeypatch.setattr(HeraTrainer, "hera_term", lambda trainer, reps, *args: probe(trainer, reps, *args))
    run_train(hera, tmp_path)
    run = json.loads((tmp_path / "hera" / "hera_run.json").read_text(encoding="utf-8"))
    chosen = {int(head.split("H")[0][1:]) for head in run["hera_heads"]}
    assert chosen and chosen <= set(head_layers), (run["hera_heads"], head_layers)
    assert set(probe.per_layer) == chosen and all(v > 0 for v in probe.per_layer.values()), probe.per_layer

    # RAH-LoRA: an adapter, and every layer left out named with its reason
    rah = {k: v for k, v in base_recipe(family, name, tmp_path / "rah").items() if not k.startswith("hera_")}
    for key in ("max_steps", "learning_rate", "lr_scheduler_type", "per_device_train_batch_size"):
        rah.pop(key, None)
    rah |= {"stage": "rah", "rah_samples": 8, "rah_probe_samples": 4, "rah_kl_samples": 4, "max_samples": 16,
            **RAH_FORCED}
    proc = run_train(rah, tmp_path)
    assert (tmp_path / "rah" / "adapter_model.safetensors").is_file()
    if name in LEFT_OUT:
        assert "RAH-LoRA: leaves out" in proc.stdout + proc.stderr and LEFT_OUT[name] in proc.stdout + proc.stderr


@pytest.mark.parametrize("name", ["gemma3n", "gemma4"])
def test_a_kv_sharing_layer_reads_the_source_transformers_gives_it_with_or_without_its_index(
        name: str, assets: TinyAssets, zoo: Callable[[str], Path]) -> None:
    """transformers 5.6 names a reading layer's source (``kv_shared_layer_index``); 5.8 keeps none (it keys the shared
    keys and values by layer type). The loaded view finds transformers' own source either way."""
    if family_too_new(name):
        pytest.skip(f"this transformers has no {name}")
    config = AutoConfig.from_pretrained(_family_assets(assets, name, zoo).models[name])
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    attentions = {layer.index: layer.module.self_attn for layer in decoder_layers(model)}
    own = {index: getattr(a, "kv_shared_layer_index", None) for index, a in attentions.items() if a.is_kv_shared_layer}
    assert own, f"{name}'s tiny model shares no keys and values"
    plans = {plan.index: plan.kv_source for plan in plan_layers(config)}
    for a in attentions.values():  # transformers 5.8's shape
        if hasattr(a, "kv_shared_layer_index"):
            del a.kv_shared_layer_index
    found = {layer.index: layer.kv_source for layer in decoder_layers(model) if layer.index in own}
    assert found == {i: plans[i] for i in own} and all(s is not None for s in found.values())
    assert all(found[i] == source for i, source in own.items() if source is not None)  # transformers' own, where kept
    for reader, source in found.items():  # 5.8's own marks: the source stores the keys and values of the reader's type
        if hasattr(attentions[source], "store_full_length_kv") and hasattr(attentions[reader], "layer_type"):
            assert attentions[source].store_full_length_kv and not attentions[reader].store_full_length_kv
            assert attentions[source].layer_type == attentions[reader].layer_type


@needs_qwen3_5
def test_a_head_in_a_layer_without_heads_is_refused_before_loading(assets: TinyAssets, zoo: Callable[[str], Path],
                                                                   tmp_path: Path) -> None:
    """Qwen3.5 (L0 linear attention, L1 softmax): HeRA's hera_heads and RAH-LoRA's rah_layers naming L0 are refused
    before the model loads (no "all params" line of the loader), naming the layers that have heads."""
    family = _family_assets(assets, "qwen3_5", zoo)
    hera = base_recipe(family, "qwen3_5", tmp_path / "hera", hera_heads=["L0H1"])
    proc = run_train(hera, tmp_path, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "all params" not in out, out[-3000:]
    assert "hera_heads: L0H1 is in layer L0" in out and "a linear attention layer without heads; its heads are in " \
        "layers L1. Choose heads there." in out, out[-3000:]
    rah = {k: v for k, v in base_recipe(family, "qwen3_5", tmp_path / "rah").items() if not k.startswith("hera_")}
    rah |= {"stage": "rah", "rah_layers": [0], "max_steps": None}
    proc = run_train({k: v for k, v in rah.items() if v is not None}, tmp_path, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "all params" not in out, out[-3000:]
    assert "rah_layers: none of the layers named can be calibrated (L0: linear attention, no heads); the " \
        "calibratable layers of" in out and "are L1. Use auto or name some of those." in out, out[-3000:]


@needs_qwen3_5
def test_a_model_without_softmax_attention_is_refused_by_name() -> None:
    """No decoder layer with heads (every layer linear attention): HeRA and RAH-LoRA refuse the family by name from its
    config; the plan of a mixed model names its layers in runs."""
    from llamafactory_hera.heads.architecture import describe, per_head_value_layers
    from llamafactory_hera.heads.geometry import attention_geometry, check_has_heads
    from llamafactory_hera.runtime.errors import RecipeError

    text = {"num_hidden_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 16, "layer_types": ["linear_attention"] * 4}
    config = AutoConfig.for_model("qwen3_5", text_config=text)
    with pytest.raises(RecipeError, match=r"stage: hera cannot run on model_type 'qwen3_5': none of its 4 decoder "
                                          r"layers has softmax self-attention .*\(its layers: linear attention\)"):
        check_has_heads(attention_geometry(config), config, "stage: hera")
    assert per_head_value_layers(plan_layers(config))[0] == []
    mixed = AutoConfig.for_model("qwen3_5", text_config=text | {"layer_types": ["linear_attention"] * 3
                                                                             + ["full_attention"]})
    assert describe(plan_layers(mixed)) == "L0-L2 linear attention, L3 softmax attention"
    gemma3n = AutoConfig.for_model("gemma3n", text_config={"num_hidden_layers": 4, "num_kv_shared_layers": 2,
                                                           "layer_types": ["sliding_attention", "full_attention"] * 2})
    assert [p.kv_source for p in plan_layers(gemma3n)] == [None, None, 0, 1]
    assert per_head_value_layers(plan_layers(gemma3n))[1] == {2: "reads the keys and values of L0",
                                                             3: "reads the keys and values of L1"}
