"""HARC's reference forward turns the adapter off as ``PeftModel.disable_adapter()`` does, without its status walk."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from llamafactory_hera.harc.trainer import AdapterSwitch


def test_the_switch_gives_peft_disable_adapter_s_model_and_leaves_the_adapter_as_it_was() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2)
    base = LlamaForCausalLM(config)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        plain = base(input_ids=ids).logits
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", modules_to_save=["lm_head"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.add_(torch.randn_like(param) * 0.1)  # an adapter that changes the output
        adapted = model(input_ids=ids).logits
        trainable = {name for name, param in model.named_parameters() if param.requires_grad}
        switch = AdapterSwitch(model)
        with switch.off():
            off = model(input_ids=ids).logits
        with model.disable_adapter():
            peft_off = model(input_ids=ids).logits
        again = model(input_ids=ids).logits
    assert len(switch.layers) == 3 * 7 + 1  # every LoRA linear and the modules_to_save wrapper
    assert not torch.allclose(adapted, plain)
    torch.testing.assert_close(off, peft_off, rtol=0, atol=0)
    torch.testing.assert_close(off, plain)
    torch.testing.assert_close(again, adapted, rtol=0, atol=0)
    assert {name for name, param in model.named_parameters() if param.requires_grad} == trainable
