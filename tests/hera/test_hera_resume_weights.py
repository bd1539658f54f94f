"""A resumed full or freeze run restores the checkpoint's weights, whatever names ``save_pretrained`` gave them.

LLaVA and Qwen2.5-VL save in their original format (``language_model.model.*``, ``model.layers.*``), not under the
names the model has in memory (``model.language_model.*``): the Trainer's own resume restored none of them, warned,
and trained on from the base weights (huggingface/transformers#43701). Each run here stops at step 1 and resumes to
step 2; weights, optimizer, HeRA's temperature, its optimizer and queue end bit-identical to the run not stopped
(``llamafactory_hera_testing.resume``). LoRA: tests/hera/test_hera_train_cli.py and test_hera_distributed.py; a
composed LLaVA: test_hera_llava15_chain.py; ZeRO-2 and ZeRO-3: test_hera_deepspeed.py; HARC (also under ZeRO-3):
tests/harc/test_harc_stage.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import base_recipe, run_train
from llamafactory_hera_testing.resume import assert_resumed_equals_whole

COMMON = {"max_samples": 16, "per_device_train_batch_size": 4, "hera_queue_size": 8, "save_strategy": "steps",
          "save_steps": 1, "max_steps": 2, "hera_lambda": 1.0}
# what save_pretrained writes for each model: its original format, which a plain load_state_dict cannot place
SAVED_PREFIX = {"llava": "language_model.model.layers.", "qwen2_5_vl": "model.layers."}


@pytest.mark.parametrize("family,finetuning", [("llava", "full"), ("llava", "freeze"), ("qwen2_5_vl", "full"),
                                               ("qwen2_5_vl", "freeze")])
def test_resumed_run_ends_as_the_run_not_stopped(assets, tmp_path: Path, family: str, finetuning: str) -> None:
    whole, resumed = tmp_path / "whole" / "out", tmp_path / "resumed" / "out"
    run_train(base_recipe(assets, family, whole, finetuning_type=finetuning, **COMMON), tmp_path / "whole")
    saved = load_file(whole / "checkpoint-1" / "model.safetensors")
    assert any(key.startswith(SAVED_PREFIX[family]) for key in saved), sorted(saved)[:5]  # the renaming is needed
    proc = run_train(base_recipe(assets, family, resumed, finetuning_type=finetuning,
                                 resume_from_checkpoint=str(whole / "checkpoint-1"), **COMMON), tmp_path / "resumed")
    assert "missing keys" not in proc.stderr + proc.stdout
    assert assert_resumed_equals_whole(whole, resumed, 2) == [
        "model", "optimizer.pt", "hera_queue_rank0.pt", "hera_state.json"]


@pytest.mark.parametrize("finetuning", ["full", "lora"])
def test_a_checkpoint_without_every_trained_tensor_is_refused(assets, tmp_path: Path, finetuning: str) -> None:
    """Before: a warning (full) or PEFT's warning (LoRA), and the run trained on from the base weights."""
    first = tmp_path / "first" / "out"
    common = {**COMMON, "finetuning_type": finetuning}
    run_train(base_recipe(assets, "llava", first, **{**common, "max_steps": 1}), tmp_path / "first")
    checkpoint = first / "checkpoint-1"
    name = "model.safetensors" if finetuning == "full" else "adapter_model.safetensors"
    tensors = load_file(checkpoint / name)
    kept = {key: value for key, value in tensors.items() if ".layers.1." not in key}
    save_file(kept, checkpoint / name, metadata={"format": "pt"})
    proc = run_train(base_recipe(assets, "llava", tmp_path / "again" / "out", resume_from_checkpoint=str(checkpoint),
                                 **common), tmp_path / "again", check=False)
    assert proc.returncode == 1
    message = next(line for line in proc.stderr.splitlines() if line.startswith("[llamafactory-hera] error: "))
    assert f"resume_from_checkpoint: {checkpoint} restores " in message, proc.stderr[-2000:]
    assert " tensors this run trains (" in message and ".layers.1." in message and "overwrite_output_dir" in message
    assert not (tmp_path / "again" / "out" / "checkpoint-2").exists()


def test_load_best_model_at_end_restores_the_best_checkpoint(assets, tmp_path: Path) -> None:
    """The same load path at the end of a run: the saved model is the best checkpoint's (before: the last weights,
    a warning about missing keys). At this learning rate the eval loss rises at step 2: the best is step 1's."""
    out = tmp_path / "out"
    evaluation = {"val_size": 0.25, "eval_strategy": "steps", "eval_steps": 1, "per_device_eval_batch_size": 4,
                  "load_best_model_at_end": True, "metric_for_best_model": "eval_loss"}
    run_train(base_recipe(assets, "llava", out, finetuning_type="full", learning_rate=1e-2,
                          **{**COMMON, **evaluation}), tmp_path)
    state = json.loads((out / "trainer_state.json").read_text())
    best = Path(state["best_model_checkpoint"])
    assert best.name == "checkpoint-1"
    saved, wanted = load_file(out / "model.safetensors"), load_file(best / "model.safetensors")
    assert saved.keys() == wanted.keys() and all(torch.equal(saved[key], wanted[key]) for key in saved)


def test_a_checkpoint_with_or_without_the_base_model_prefix_restores_every_tensor(tmp_path: Path) -> None:
    """The renaming's base-model-prefix case, as ``from_pretrained`` renames: the bare decoder's checkpoint
    (``layers.0.*``, what a base model's ``save_pretrained`` writes) restores into the model with a head
    (``model.layers.0.*``), and the head model's checkpoint into the bare decoder (``model.`` dropped, ``lm_head`` left
    out). Without the prefix (the mutant ``prefix = None``) neither restores a tensor."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

    from llamafactory_hera.training.checkpoint_weights import model_keys, restore_weights

    config = LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    torch.manual_seed(0)
    saved = LlamaForCausalLM(config)
    for name, model, tensors in (("bare", LlamaForCausalLM(config), saved.model.state_dict()),
                                 ("with_head", LlamaModel(config), saved.state_dict())):
        own = "model.layers.0.mlp.up_proj.weight" if name == "bare" else "layers.0.mlp.up_proj.weight"
        assert model_keys(model, ["layers.0.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.weight"]) == {
            "layers.0.mlp.up_proj.weight": own, "model.layers.0.mlp.up_proj.weight": own}
        folder = tmp_path / name
        folder.mkdir()
        save_file({key: value.clone() for key, value in tensors.items()}, folder / "model.safetensors")
        inner = model.model if name == "bare" else model
        assert not torch.equal(inner.layers[0].mlp.up_proj.weight, saved.model.layers[0].mlp.up_proj.weight)
        restore_weights(model, str(folder))  # raises unless every trained tensor was restored
        assert all(torch.equal(value, saved.model.state_dict()[key]) for key, value in inner.state_dict().items())
