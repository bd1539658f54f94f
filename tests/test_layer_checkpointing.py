"""training/layer_checkpointing.py on tiny text models, in this process (no run_exp): what ``LayerCheckpointing``
switches, what it leaves as the recipe has it, and the gradient under KV sharing.

KV sharing (a tiny Gemma 4: layers sliding, full, sliding, sliding, full; layer 3 reads layer 2's keys and values,
layer 4 reads layer 1's): the gradient under LLaMA-Factory's reentrant checkpointing with every KV-sharing chain
switched equals the one without checkpointing; reentrant everywhere drops the readers' gradient into the sources' keys
and values; the rule is minimal: a non-reentrant source with reentrant readers fails in backward, non-reentrant readers
of a reentrant source drop the gradient.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch.utils.checkpoint import checkpoint
from transformers import Gemma4ForCausalLM, Gemma4TextConfig, LlamaConfig, LlamaForCausalLM

from llamafactory_hera.training.layer_checkpointing import LayerCheckpointing, checkpointing_kind


def _host_function(reentrant: bool):
    """LLaMA-Factory's function for every layer under ``use_reentrant_gc: reentrant``."""
    from llamafactory.model.model_utils.checkpointing import get_custom_gradient_checkpointing_func

    return get_custom_gradient_checkpointing_func(partial(checkpoint, use_reentrant=reentrant))


def _checkpointed(model: torch.nn.Module, reentrant: bool | None) -> torch.nn.Module:
    """``model`` in training mode, every layer under LLaMA-Factory's function (``None``: no checkpointing)."""
    if reentrant is not None:
        model._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=_host_function(reentrant))
    return model.train()


def _llama(layers: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def _gemma4() -> torch.nn.Module:
    torch.manual_seed(0)
    config = Gemma4TextConfig(vocab_size=64, vocab_size_per_layer_input=64, hidden_size=32, intermediate_size=32,
                              num_hidden_layers=5, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                              global_head_dim=16, hidden_size_per_layer_input=4, num_kv_shared_layers=2,
                              sliding_window=4, max_position_embeddings=64,
                              layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                           "sliding_attention", "full_attention"])
    return Gemma4ForCausalLM(config).float()


def _kinds(model: torch.nn.Module) -> list[str]:
    return [checkpointing_kind(layer) for layer in model.model.layers]


def test_the_methods_layers_are_switched_and_the_others_keep_their_own_function() -> None:
    model = _checkpointed(_llama(), reentrant=True)
    layers = list(model.model.layers)
    originals = [layer._gradient_checkpointing_func for layer in layers]
    switch = LayerCheckpointing(model, [1, 2], "the test's layers")
    assert _kinds(model) == ["reentrant", "non-reentrant", "non-reentrant", "reentrant"]
    assert [layers[i]._gradient_checkpointing_func is originals[i] for i in range(4)] == [True, False, False, True]
    assert switch.line() == ("gradient checkpointing: reentrant (the recipe's) in 2 of 4 decoder layers; non-reentrant "
                             "in layers 1, 2 (the test's layers)")


def _gradients(model: torch.nn.Module, switched: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Every parameter's gradient of the LM loss on one fixed batch; ``switched``: these layers made non-reentrant by
    hand (the rest as the model's checkpointing)."""
    if switched is not None:
        function = _host_function(False)
        for index in switched:
            model.model.layers[index]._gradient_checkpointing_func = function
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    return {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}


def _differing(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> list[str]:
    assert grads.keys() == reference.keys()
    return [name for name, grad in grads.items() if not torch.allclose(grad, reference[name], rtol=1e-5, atol=1e-7)]


def test_kv_sharing_chains_run_non_reentrant_and_the_gradient_is_exact() -> None:
    reference = _gradients(_checkpointed(_gemma4(), reentrant=None))
    assert _differing(_gradients(_checkpointed(_gemma4(), reentrant=False)), reference) == []

    model = _checkpointed(_gemma4(), reentrant=True)
    switch = LayerCheckpointing(model, [], "the test's layers")
    assert _kinds(model) == ["reentrant"] + ["non-reentrant"] * 4
    assert switch.line() == ("gradient checkpointing: reentrant (the recipe's) in 1 of 5 decoder layers; non-reentrant "
                             "in layers 1, 2, 3, 4 (keys and values shared: layer 4 reads layer 1's; layer 3 reads "
                             "layer 2's)")
    assert _differing(_gradients(model), reference) == []

    # LLaMA-Factory's default: the sources' key and value projections (and what feeds them) miss the readers' part
    dropped = _differing(_gradients(_checkpointed(_gemma4(), reentrant=True)), reference)
    assert {"model.layers.1.self_attn.k_proj.weight", "model.layers.2.self_attn.v_proj.weight"} <= set(dropped)
    assert not any(name.startswith(("model.layers.3.", "model.layers.4.")) for name in dropped), dropped
    # minimal: readers without their sources drop it too; sources without their readers fail in backward
    assert _differing(_gradients(_checkpointed(_gemma4(), reentrant=True), switched=[3, 4]), reference)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        _gradients(_checkpointed(_gemma4(), reentrant=True), switched=[1, 2])
