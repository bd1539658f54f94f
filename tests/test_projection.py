"""Per-head decomposition of o_proj on real forwards of every tiny architecture, with and without LoRA."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from llamafactory_hera.heads.architecture import head_projections
from llamafactory_hera.heads.geometry import HeadRef, attention_geometry
from llamafactory_hera.heads.pooling import pooling_weights
from llamafactory_hera.hera.capture import HeadCapture
from llamafactory_hera_testing.projection import project_heads

FAMILIES = ("qwen3_vl", "qwen2_5_vl", "llava")


def _load(assets, family: str, lora: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(assets.models[family], dtype=torch.float32).eval()
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"], lora_dropout=0.0,
                                                 init_lora_weights=False))
    return model


def _batch(assets, family: str) -> dict[str, torch.Tensor]:
    rows = json.loads((assets.dataset_dir / "hera_demo.json").read_text())[:2]
    processor = AutoProcessor.from_pretrained(assets.models[family])
    token = "<image>" if family == "llava" else "<|vision_start|><|image_pad|><|vision_end|>"
    texts = [f"{token} {row['messages'][1]['content']}" for row in rows]
    images = [Image.open(assets.dataset_dir / row["images"][0]).convert("RGB") for row in rows]
    return processor(text=texts, images=images, return_tensors="pt", padding=True)


@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_head_contributions_sum_to_o_proj(assets, family: str, lora: bool) -> None:
    model = _load(assets, family, lora)
    geometry = attention_geometry(AutoConfig.from_pretrained(assets.models[family]))
    o_projs = head_projections(model)
    assert len(o_projs) == geometry.num_layers
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = [m.register_forward_hook(lambda mod, a, out, i=i: seen.__setitem__(i, (a[0], out)))
               for i, m in o_projs.items()]
    with torch.no_grad():
        model(**_batch(assets, family))
    for handle in handles:
        handle.remove()
    assert sorted(seen) == list(range(geometry.num_layers))
    for layer, (x, out) in seen.items():
        assert x.shape[-1] == geometry.num_heads * geometry.head_dim
        parts = project_heads(o_projs[layer], x, list(range(geometry.num_heads)), geometry.head_dim)  # every head
        bias = getattr(getattr(o_projs[layer], "base_layer", o_projs[layer]), "bias", None)
        expected = out - (bias if bias is not None else 0)
        torch.testing.assert_close(parts.sum(0), expected.float(), rtol=1e-4, atol=1e-5)
        # Each part really is one head: zeroing every other head's input slice reproduces it.
        head = geometry.num_heads - 1
        only = torch.zeros_like(x)
        cols = slice(head * geometry.head_dim, (head + 1) * geometry.head_dim)
        only[..., cols] = x[..., cols]
        with torch.no_grad():
            single = o_projs[layer](only) - (bias if bias is not None else 0)
        torch.testing.assert_close(parts[head], single.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("interleaved", [False, True])
def test_capture_equals_explicit_pooled_contributions(assets, family: str, interleaved: bool) -> None:
    """Every head pooled and projected at once (per head size: one pooling, one projection), against each head's
    explicit mean over its tokens; the heads in layer order, or interleaved (put back in recipe order)."""
    model = _load(assets, family, lora=True)
    geometry = attention_geometry(model.config)
    last = geometry.num_layers - 1
    heads = [HeadRef(last, 2), HeadRef(0, 1), HeadRef(last, 0)] if interleaved else [
        HeadRef(0, 1), HeadRef(last, 0), HeadRef(last, 2)]
    batch = _batch(assets, family)
    mask = batch["attention_mask"].bool() & (torch.rand(batch["input_ids"].shape, generator=torch.Generator()
                                                         .manual_seed(1)) > 0.3)
    o_projs = head_projections(model)
    inputs: dict[int, torch.Tensor] = {}
    handles = [o_projs[h.layer].register_forward_hook(lambda mod, a, out, i=h.layer: inputs.__setitem__(i, a[0]))
               for h in heads]
    capture = HeadCapture(model, heads, geometry)
    capture.arm()
    with torch.no_grad():
        model(**batch)
    got = capture.disarm(pooling_weights(mask))
    for handle in handles:
        handle.remove()
    assert got.shape == (len(heads), mask.shape[0], geometry.hidden_size)
    for n, ref in enumerate(heads):
        head_input = inputs[ref.layer][..., ref.head * geometry.head_dim:(ref.head + 1) * geometry.head_dim]
        per_token = project_heads(o_projs[ref.layer], head_input, [ref.head], geometry.head_dim)[0]
        for b in range(mask.shape[0]):  # slow reference: explicit mean over the selected tokens
            want = per_token[b][mask[b]].mean(0)
            torch.testing.assert_close(got[n, b], want, rtol=1e-4, atol=1e-5)
    # Disarmed: a second forward (as under gradient-checkpoint recomputation) stores nothing.
    with torch.no_grad():
        model(**batch)
    assert capture.disarm(pooling_weights(mask)) is None


@pytest.mark.parametrize("adapter", ["full", "lora", "dora"])
def test_a_zero3_partitioned_o_proj_is_read_in_its_calls(adapter: str) -> None:
    """Under ZeRO-3 (a stand-in: every weight an empty placeholder outside its module's call, gathered by hooks for
    the forward and the backward) HeRA copies the heads' columns in o_proj's own calls and gathers nothing after:
    the heads' values and every parameter's gradient (HeRA's plus the call's own) equal the unpartitioned layer's
    effective-weight path; reading the weight outside a call names the fix."""
    from llamafactory_hera.hera.projection import effective_weight_columns
    from llamafactory_hera_testing.zero3 import partition_like_zero3, project_in_call

    torch.manual_seed(0)
    models = []
    for _ in range(2):
        holder = torch.nn.Module()
        holder.o_proj = torch.nn.Linear(12, 8, bias=False)
        models.append(holder if adapter == "full" else get_peft_model(holder, LoraConfig(
            r=2, target_modules=["o_proj"], init_lora_weights=False, use_dora=adapter == "dora")))
    models[1].load_state_dict(models[0].state_dict())
    whole, partitioned = (next(m for n, m in model.named_modules() if n.endswith("o_proj")) for model in models)
    if adapter != "dora":  # PEFT's DoRA reads lora_A's and the base's weights outside their calls, which ZeRO-3 gathers
        partition_like_zero3(partitioned)  # on access (its ZeROOrderedDict; not this stand-in): marked only, below
    pooled, call_input, target = torch.randn(5, 2 * 4), torch.randn(3, 12), torch.randn(2, 5, 8)
    got, output = project_in_call(partitioned, pooled, [0, 2], 4, call_input)
    want = project_heads(whole, pooled, [0, 2], 4)
    torch.testing.assert_close(got, want)
    assert adapter == "dora" or (partitioned if adapter == "full" else partitioned.base_layer).weight.ndim == 1
    ((got * target).sum() + output.square().sum()).backward()
    ((want * target).sum() + whole(call_input).square().sum()).backward()
    grads = {name: p.grad for name, p in models[1].named_parameters()}
    assert grads and all(grads[name] is not None for name, p in models[0].named_parameters() if p.requires_grad)
    for name, p in models[0].named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[name], p.grad, msg=name)
    partitioned(torch.zeros(1, 12))  # released again
    if adapter == "dora":
        return
    with pytest.raises(RuntimeError, match="ZeRO-3 partition; read it inside deepspeed.zero.GatheredParameters"):
        effective_weight_columns(partitioned, torch.arange(4))
