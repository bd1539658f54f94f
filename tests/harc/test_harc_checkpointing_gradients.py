"""HARC's checkpointing decided by what its gradients need (it switches no layer of its own): the coupling reads the
residual entering each coupled layer with a forward pre-hook on the layer, i.e. the checkpoint's own input, which
keeps its autograd graph under reentrant checkpointing too (only what is computed inside a reentrant layer's first
forward has none).

HarcTrainerMixin.method_loss (its four terms, coupled layers 1 and 3 of the tiny Llama-3 with LoRA) then backward,
under LLaMA-Factory's own checkpointing function: the gradient of every LoRA tensor with reentrant checkpointing in
every layer equals the one with the coupled layers non-reentrant (the switch HARC had), non-reentrant everywhere, and
no checkpointing; the coupling's own gradient reaches the reentrant layers below the coupled ones.
"""

from __future__ import annotations

import importlib.util
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import harc_numerics_helpers
import pytest
import torch
from harc_numerics_helpers import lora_model, training_rows
from torch.utils.checkpoint import checkpoint

from llamafactory_hera.harc.batches import collate_rows
from llamafactory_hera.harc.config import HarcArguments
from llamafactory_hera.harc.directions import Directions
from llamafactory_hera.heads.architecture import text_decoder
from llamafactory_hera.training.layer_checkpointing import LayerCheckpointing, checkpointing_kind

numerics_assets = harc_numerics_helpers.numerics_assets
tiny = harc_numerics_helpers.tiny

LAYERS = [1, 3]


def _trainer(t: SimpleNamespace, reentrant: bool | None,
             weights: tuple[float, float, float, float] = (1.0, 1.0, 10.0, 1.0)) -> tuple[Any, Any, dict]:
    """(HarcTrainerMixin with what method_loss reads, the LoRA model under LLaMA-Factory's checkpointing function
    (``None``: none), a micro-batch); the caller sets ``harc_checkpointing``."""
    from llamafactory.model.model_utils.checkpointing import get_custom_gradient_checkpointing_func

    from llamafactory_hera.harc.trainer import HarcTrainerMixin

    torch.manual_seed(0)  # PEFT draws lora_A from the global generator
    model = lora_model(t.folder, seed=2).train()
    if reentrant is not None:
        function = get_custom_gradient_checkpointing_func(partial(checkpoint, use_reentrant=reentrant))
        model.get_base_model()._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=function)
    config = t.model.config
    generator = torch.Generator().manual_seed(9)
    directions = Directions(*(torch.nn.functional.normalize(
        torch.randn(config.num_hidden_layers, config.hidden_size, generator=generator), dim=-1) for _ in range(4)))
    trainer = object.__new__(HarcTrainerMixin)
    trainer.harc_args = HarcArguments(harc_harmful="h", harc_harmless="s", harc_pseudo="p", harc_margin=0.5,
                                      harc_response_tokens=4, harc_weight_couple=weights[0],
                                      harc_weight_couple_resp=weights[1], harc_weight_kl=weights[2],
                                      harc_weight_ce=weights[3])
    trainer.harc_state = SimpleNamespace(current=directions, layers=list(LAYERS))
    trainer.accelerator = SimpleNamespace(unwrap_model=lambda inner: inner)
    trainer._harc_sums = torch.zeros(5, dtype=torch.float64)
    return trainer, model, dict(collate_rows(training_rows(t), t.tokenizer.pad_token_id))


def _kinds(model: Any) -> list[str]:
    return [checkpointing_kind(layer) for layer in text_decoder(model).layers]


def _gradients(t: SimpleNamespace, reentrant: bool | None, switched: list[int],
               weights: tuple[float, float, float, float] = (1.0, 1.0, 10.0, 1.0)) -> tuple[dict, list[str]]:
    """(LoRA gradients of one method_loss + backward, each decoder layer's checkpointing kind in it)."""
    trainer, model, batch = _trainer(t, reentrant, weights)
    trainer.harc_checkpointing = LayerCheckpointing(model, switched, "the test's layers")
    trainer.method_loss(model, batch).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}, _kinds(model)


def test_harc_gradient_under_reentrant_checkpointing_everywhere_is_exact(tiny: dict[str, SimpleNamespace]) -> None:
    t = tiny["llama3"]
    everywhere, kinds = _gradients(t, reentrant=True, switched=[])
    assert set(kinds) == {"reentrant"}, kinds
    others = {"switch": _gradients(t, reentrant=True, switched=LAYERS), "non_reentrant": _gradients(t, False, []),
              "off": _gradients(t, None, [])}
    assert others["switch"][1] == ["non-reentrant" if i in LAYERS else "reentrant" for i in range(len(kinds))]
    for setting, (grads, _) in others.items():
        assert grads.keys() == everywhere.keys() and any("layers.0." in name for name in grads)
        for name, grad in grads.items():
            torch.testing.assert_close(everywhere[name], grad, rtol=1e-5, atol=1e-7, msg=f"{setting}: {name}")
    # the coupling alone: its gradient reaches layer 0 (reentrant, below both coupled layers) and nothing above layer 3
    coupling, _ = _gradients(t, reentrant=True, switched=[], weights=(1.0, 1.0, 0.0, 0.0))
    assert any(float(g.abs().max()) > 0 for name, g in coupling.items() if ".layers.0." in name)
    assert all(float(g.abs().max()) == 0 for name, g in coupling.items() if ".layers.3." in name)


def test_the_checkpointing_stays_the_recipes_through_a_refresh(tiny: dict[str, SimpleNamespace]) -> None:
    """As the trainer sets it up at the start (``LayerCheckpointing(model, [], "HARC")``: KV-sharing chains only, none
    on Llama), then a refresh moves the coupled layers: every layer checkpoints reentrantly in both steps."""
    trainer, model, batch = _trainer(tiny["llama3"], reentrant=True)
    trainer.harc_checkpointing = LayerCheckpointing(model, [], "HARC")
    trainer.method_loss(model, dict(batch)).backward()
    assert set(_kinds(model)) == {"reentrant"}, _kinds(model)
    trainer.harc_state.layers = [2]  # a refresh
    trainer.method_loss(model, dict(batch)).backward()
    assert set(_kinds(model)) == {"reentrant"}, _kinds(model)
    line = trainer.harc_checkpointing.line()
    assert line == "gradient checkpointing: reentrant (the recipe's) in every decoder layer", line


class _DetachedCopy(torch.autograd.Function):
    """What DeepSpeed ZeRO-3's forward pre-hook on every module returns for each input tensor
    (``PostBackwardFunctionModule``: a detached copy whose backward passes the gradient through, for its bookkeeping):
    inside a reentrant layer's first forward (no_grad) the copy has no graph."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


def test_the_residual_is_read_before_a_zero3_style_pre_hook_detaches_it(tiny: dict[str, SimpleNamespace]) -> None:
    """The case a read after the other pre-hooks misses (HARC under ZeRO-3 on two ranks, reentrant checkpointing:
    'the residual entering decoder layer 1 carries no gradient'): every decoder layer carries, registered before HARC's
    read, a pre-hook that hands the layer detached copies of its inputs, as ZeRO-3's does. HARC's read still gets the
    checkpoint's own input, and the gradients equal those without the hooks."""
    t = tiny["llama3"]
    want, _ = _gradients(t, reentrant=True, switched=[])
    trainer, model, batch = _trainer(t, reentrant=True)
    trainer.harc_checkpointing = LayerCheckpointing(model, [], "the test's layers")
    copies: list[bool] = []

    def zero3_like(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict]:
        copy = _DetachedCopy.apply(args[0] if args else kwargs["hidden_states"])
        copies.append(copy.requires_grad)
        return ((copy, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": copy})

    for layer in text_decoder(model).layers:
        layer.register_forward_pre_hook(zero3_like, with_kwargs=True)
    trainer.method_loss(model, batch).backward()
    got = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    assert copies and False in copies  # the copies made in the first forward of a reentrant layer had no graph
    assert got.keys() == want.keys()
    for name, grad in got.items():
        torch.testing.assert_close(want[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def _gemma4_text(t: SimpleNamespace, folder: Path) -> SimpleNamespace:
    """A tiny Gemma 4 text model for ``t``'s tokenizer: layers sliding, full, sliding, sliding, full; the last one
    reads layer 1's keys and values (a KV-sharing chain 1 -> 4), so coupled layer 1 is a source layer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "gemma4_text", vocab_size=len(t.tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=5,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32, sliding_window=16,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention",
                     "full_attention"], num_kv_shared_layers=1, hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=len(t.tokenizer), max_position_embeddings=4096,
        pad_token_id=t.tokenizer.pad_token_id, eos_token_id=t.tokenizer.eos_token_id)
    torch.manual_seed(3)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return SimpleNamespace(**{**vars(t), "folder": folder, "model": AutoModelForCausalLM.from_pretrained(folder)})


def test_harc_gradient_on_a_kv_sharing_model_is_exact_with_a_coupled_source_layer(
        tiny: dict[str, SimpleNamespace], tmp_path: Path) -> None:
    """Gemma 4: a layer that reads another's keys and values gets them outside its checkpointed call, so
    reentrant checkpointing drops that gradient. The trainer's ``LayerCheckpointing(model, [], "HARC")`` runs the
    chain (layers 1 and 4) non-reentrant, the other layers reentrant: HARC's gradient, coupled layers 1 (the source)
    and 3, equals the one without checkpointing and the one with non-reentrant checkpointing everywhere; reentrant
    everywhere gives another gradient."""
    if importlib.util.find_spec("transformers.models.gemma4") is None:
        pytest.skip("this transformers has no Gemma 4")
    t = _gemma4_text(tiny["llama3"], tmp_path / "gemma4")
    grads = {}
    for name, reentrant, harc in (("off", None, True), ("harc", True, True), ("reentrant", True, False),
                                  ("non_reentrant", False, True)):
        trainer, model, batch = _trainer(t, reentrant)
        trainer.harc_checkpointing = LayerCheckpointing(model, [], "HARC") if harc else SimpleNamespace(
            ensure=lambda: None)  # LLaMA-Factory's reentrant kind in every layer
        trainer.method_loss(model, batch).backward()
        grads[name] = {key: p.grad.clone() for key, p in model.named_parameters() if p.grad is not None}
        if name == "harc":
            assert _kinds(model) == ["reentrant", "non-reentrant", "reentrant", "reentrant", "non-reentrant"]
    assert grads["harc"].keys() == grads["off"].keys() and any(".layers.1.self_attn.k_proj" in k for k in grads["off"])
    for name in ("harc", "non_reentrant"):  # the reentrant layers' recompute rounds differently: up to 8e-7 of ~1
        for key, grad in grads[name].items():
            torch.testing.assert_close(grad, grads["off"][key], rtol=1e-5, atol=2e-6, msg=f"{name}: {key}")
    # LLaMA-Factory's reentrant kind everywhere drops the reader's gradient into layer 1's keys and values (and what
    # flows on from them): off by up to a tenth of the gradient
    dropped = [key for key, grad in grads["reentrant"].items() if (grad - grads["off"][key]).abs().max() > 1e-2]
    assert any(".layers.1.self_attn.k_proj" in key or ".layers.1.self_attn.v_proj" in key for key in dropped), dropped
