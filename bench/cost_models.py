"""The models and the step bench/cost.py counts: published architectures built from their configs under fake tensors
(no weights), and the sharding the package's step (``llamafactory_hera.plan.step``, whose module doc lists its shims:
4-bit, Liger, the anchors' count exchange) leaves to the bench.

What is not the recipe's own code, and why:
- DeepSpeed ZeRO-3 cannot run here: it is counted as FSDP2 with ZeRO-3's dtypes (bf16 gathers and reduce-scatters,
  fp32 master weights, gradients and Adam moments sharded: 16 bytes per parameter / N, as ZeRO-3's bf16 partition
  + fp32 master + moments); HeRA reads its heads' columns as under ZeRO-3, in ``o_proj``'s modules' own calls
  (``capture.InCallColumns``), where FSDP2's weights are unsharded as ZeRO-3's are gathered (:func:`zero3_reads`).
- The anchors' count exchange of ``gather_batch`` (one integer per rank, read on the host) cannot run on fake tensors:
  every rank is given the micro-batch's rows as anchors and the gather is ``_GatherWithGrad`` itself
  (:func:`gathered_hera_term`).
- 4-bit under FSDP2: HeRA's read of ``o_proj`` dequantizes each rank's rows and gathers their columns
  (:func:`quantize_in_place`).
"""

from __future__ import annotations

import contextlib
import types
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from llamafactory_hera.hera import projection
from llamafactory_hera.hera.loss import _GatherWithGrad, distributed, hera_loss_anchored, used_temperature
from llamafactory_hera.plan import step as plan_step
from llamafactory_hera.plan.step import (  # noqa: F401  the step, written once in the package
    Batch,
    ChunkedLinearCrossEntropy,
    Dequantized,
    HeraParts,
    add_lora,
    batch,
    build,
    hera_parts,
    output_layer,
    set_trainable,
    step,
    train_mode,
)

# Published sizes (the checkpoints' config.json). Qwen3-VL-8B-Instruct: 8.767B parameters; Qwen2.5-VL-72B-Instruct:
# 73.4B.
QWEN3_VL_8B = {
    "family": "qwen3_vl", "image_side": 512, "patch": 16,
    "text": {"hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
             "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "rms_norm_eps": 1e-6,
             "tie_word_embeddings": False,
             "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                                 "mrope_interleaved": True}},
    "vision": {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16, "out_hidden_size": 4096,
               "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 2304,
               "deepstack_visual_indexes": [8, 16, 24], "hidden_act": "gelu_pytorch_tanh"},
}
QWEN2_5_VL_72B = {
    "family": "qwen2_5_vl", "image_side": 448, "patch": 14,
    "text": {"hidden_size": 8192, "intermediate_size": 29568, "num_hidden_layers": 80, "num_attention_heads": 64,
             "num_key_value_heads": 8, "vocab_size": 152064, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
             "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}},
    "vision": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3456, "num_heads": 16, "out_hidden_size": 8192,
               "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
               "fullatt_block_indexes": [7, 15, 23, 31], "hidden_act": "silu"},
}
DINOV2_LARGE = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096,
                "image_size": 224, "patch_size": 14}


def reduced(spec: dict, text_layers: int, vision_depth: int) -> Any:
    """The transformers config of ``spec`` with ``text_layers`` decoder layers and ``vision_depth`` vision blocks
    (its DeepStack / full-attention block indices moved into the reduced tower, as many as the full one has)."""
    from transformers import AutoConfig

    vision = dict(spec["vision"], depth=vision_depth)
    for key in ("deepstack_visual_indexes", "fullatt_block_indexes"):
        if key in vision:
            vision[key] = list(range(min(len(vision[key]), vision_depth)))
    config = AutoConfig.for_model(spec["family"], text_config=dict(spec["text"], num_hidden_layers=text_layers),
                                  vision_config=vision)
    config._attn_implementation = "sdpa"
    config.text_config._attn_implementation = "sdpa"
    config.vision_config._attn_implementation = "sdpa"
    return config


@contextlib.contextmanager
def zero3_reads(on: bool) -> Any:
    """Within it (when ``on``), HeRA takes every ``o_proj`` weight for a ZeRO-3 partition: its heads' columns are read
    in the modules' calls (``capture.InCallColumns``), as under DeepSpeed ZeRO-3."""
    from llamafactory_hera.hera import capture

    own = capture.is_zero3_partition
    if on:
        capture.is_zero3_partition = lambda weight: True
    try:
        yield
    finally:
        capture.is_zero3_partition = own


def shard(model: nn.Module, mesh: Any, reduce_dtype: torch.dtype, fp32_params: bool) -> None:
    """FSDP2 as accelerate applies it: every decoder layer and vision block its own group, then the root; the
    parameters upcast to float32 first (accelerate's mixed precision), gathered in bf16."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if fp32_params:  # model.float() cannot swap a fake parameter that something holds a weak reference to; 4-bit
        # codes stay in their storage dtype (llamafactory_hera_patches.engines.fsdp_qlora keeps them out of the upcast)
        for module in model.modules():
            for param in module.parameters(recurse=False):
                if not isinstance(module.forward, types.FunctionType):  # quantize_in_place's layers' own forward
                    param.data = param.data.float()
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=reduce_dtype)
    names = ("DecoderLayer", "VisionBlock")
    for module in [m for m in model.modules() if type(m).__name__.endswith(names)]:
        fully_shard(module, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def sharded_four_bit_columns(base: nn.Module, columns: torch.Tensor | None = None) -> torch.Tensor:
    """HeRA's 4-bit read of ``o_proj`` under FSDP2: each rank's rows dequantized, their columns gathered
    (``projection.sharded_columns``); otherwise the package's (``plan.step.four_bit_columns``)."""
    weight = base.weight.detach()
    if getattr(base, "four_bit", False) and hasattr(weight, "to_local") and columns is not None:
        local = weight.to_local().clone()[:, columns].to(torch.bfloat16)
        return DTensor.from_local(local, weight.device_mesh, weight.placements).full_tensor().float()
    return plan_step.four_bit_columns(base, columns)


def quantize_in_place(model: nn.Module) -> list[nn.Linear]:
    """The package's 4-bit step (``plan.step.quantize_in_place``) with :func:`sharded_four_bit_columns`."""
    layers = plan_step.quantize_in_place(model)
    projection.base_weight_columns = sharded_four_bit_columns
    return layers


def gathered_hera_term(parts: HeraParts, reps: torch.Tensor, teacher_dim: int = 1024) -> torch.Tensor:
    """HeraTrainer.hera_term for a micro-batch whose samples are all anchors: the global batch gathered under
    ``hera_gather`` (the default) when distributed (this rank is rank 0), the teacher's cached features."""
    if not distributed():
        return plan_step.hera_term(parts, reps, teacher_dim)
    size = reps.shape[1]
    teacher = torch.empty(size, teacher_dim)
    candidates = _GatherWithGrad.apply(reps.contiguous())
    gathered = [torch.empty_like(teacher) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, teacher)
    k = min(parts.k, candidates.shape[1] - 1)
    return hera_loss_anchored(reps, candidates, torch.arange(size), teacher, torch.cat(gathered), k,
                              used_temperature(parts.log_tau), parts.similarity).mean()
