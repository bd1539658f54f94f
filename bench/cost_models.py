"""The models and the step bench/cost.py counts: published architectures built from their configs under fake tensors
(no weights), the recipe's adapters and sharding, and one training micro-step of SFT or HeRA through the plugin's own
code (``HeadCapture``, ``LayerCheckpointing``, ``hera_loss_anchored``, the gather's ``_GatherWithGrad``).

What is not the recipe's own code, and why:
- 4-bit (QLoRA): bitsandbytes cannot run on fake tensors. The weights are built in bf16, their storage is counted
  from the quantization (recipes/memory.py's bytes per weight), and each base linear layer runs as bitsandbytes'
  ``MatMul4Bit`` does: the weight dequantized to bf16 for the product, in forward and again in backward, nothing
  saved (:class:`Dequantized`); HeRA's ``o_proj`` read dequantizes the whole weight in bf16 (its heads' columns
  cast to float32), as ``base_weight_columns``' 4-bit branch does.
- DeepSpeed ZeRO-3 cannot run here: it is counted as FSDP2 with ZeRO-3's dtypes (bf16 gathers and reduce-scatters,
  fp32 master weights, gradients and Adam moments sharded: 16 bytes per parameter / N, as ZeRO-3's bf16 partition
  + fp32 master + moments); HeRA reads its heads' columns as under ZeRO-3, in ``o_proj``'s modules' own calls
  (``capture.InCallColumns``), where FSDP2's weights are unsharded as ZeRO-3's are gathered (:func:`zero3_reads`).
- The anchors' count exchange of ``gather_batch`` (one integer per rank, read on the host) cannot run on fake
  tensors: every rank is given the recipe's micro-batch of anchors and the gather is ``_GatherWithGrad`` itself.
- Liger's fused linear cross-entropy (a Triton kernel, GPU only) is counted by its algorithm: the rows in chunks of
  Liger's size, each chunk's logits and their gradient made and dropped in forward, only the hidden states' gradient
  kept (:class:`ChunkedLinearCrossEntropy`).
"""

from __future__ import annotations

import contextlib
import math
import types
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

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
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


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


def build(config: Any) -> nn.Module:
    """The MLLM of ``config`` in bf16 (call under ``FakeTensorMode``: no memory, no data)."""
    from transformers import AutoModelForImageTextToText

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        return AutoModelForImageTextToText.from_config(config)
    finally:
        torch.set_default_dtype(previous)


def add_lora(model: nn.Module, rank: int, alpha: int) -> nn.Module:
    """LLaMA-Factory's LoRA on every linear layer of the language model, trainable weights upcast to float32."""
    from peft import LoraConfig, get_peft_model

    move = nn.Module.to
    nn.Module.to = lambda self, *_, **__: self  # one device, one dtype: peft's moves are no-ops, and Module.to cannot
    try:  # swap a fake parameter that transformers' initialisation holds a weak reference to
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=LORA_TARGETS,
                                                 lora_dropout=0.0))
    finally:
        nn.Module.to = move
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    return model


def freeze_vision(model: nn.Module) -> None:
    """freeze_vision_tower: true (the merger included, as freeze_multi_modal_projector leaves the LoRA recipes')."""
    visual = next(m for name, m in model.named_modules() if name.endswith("visual"))
    visual.requires_grad_(False)


@dataclass
class Batch:
    """One micro-batch's real integer inputs and fake pixels."""

    inputs: dict[str, Any]
    token_mask: torch.Tensor  # [B, S] the pooled (answer) tokens


def batch(config: Any, spec: dict, size: int, seq: int) -> Batch:
    """``size`` rows of ``seq`` tokens, each with one ``image_side``² image (its tokens at the front, text after; the
    second half of the text is the answer, pooled by ``hera_pooling: assistant``). Integer inputs real, made outside
    the fake mode."""
    merge = config.vision_config.spatial_merge_size
    side = spec["image_side"] // spec["patch"]
    image_tokens = side * side // merge // merge
    ids = torch.full((size, seq), 100, dtype=torch.long)
    ids[:, 4:4 + image_tokens] = config.image_token_id
    grid = torch.tensor([[1, side, side]] * size)
    labels = ids.clone()
    labels[:, : (seq + image_tokens) // 2] = -100
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "image_grid_thw": grid, "labels": labels}
    if spec["family"] == "qwen3_vl":
        inputs["mm_token_type_ids"] = (ids == config.image_token_id).long()
    return Batch(inputs, labels != -100)


def pixels(config: Any, grid: torch.Tensor) -> torch.Tensor:
    """Fake flattened patches for ``grid`` (call under the fake mode)."""
    v = config.vision_config
    return torch.empty(int(grid.prod(-1).sum()), 3 * v.temporal_patch_size * v.patch_size ** 2, dtype=torch.bfloat16)


class Dequantized(torch.autograd.Function):
    """bitsandbytes' 4-bit product: the weight dequantized to bf16 for the product, in forward and again in backward
    (a clone stands for ``dequantize_4bit``'s output); nothing but the stored weight is kept for backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return F.linear(x, weight.clone().to(x.dtype), bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        (weight,) = ctx.saved_tensors
        return grad @ weight.clone().to(grad.dtype), None, None


def quantize_in_place(model: nn.Module) -> list[nn.Linear]:
    """Every base ``nn.Linear`` but the output layer runs through :class:`Dequantized`; HeRA's read of ``o_proj``
    dequantizes the whole weight in bf16 and casts the heads' columns to float32 (``base_weight_columns``' 4-bit
    branch). Returns the quantized layers."""
    from llamafactory_hera.hera import projection

    layers = [m for name, m in model.named_modules() if type(m) is nn.Linear and "lm_head" not in name
              and "lora_" not in name]
    for layer in layers:
        layer.forward = (lambda m: lambda x: Dequantized.apply(x, m.weight, m.bias))(layer)

    def four_bit(base: nn.Module, columns: torch.Tensor | None = None) -> torch.Tensor:
        weight = base.weight.detach()
        if hasattr(weight, "to_local") and columns is not None:  # FSDP2: each rank's rows dequantized, their
            from torch.distributed.tensor import DTensor  # columns gathered (projection.sharded_columns)

            local = weight.to_local().clone()[:, columns].to(torch.bfloat16)
            return DTensor.from_local(local, weight.device_mesh, weight.placements).full_tensor().float()
        full = weight.clone()  # dequantize_4bit's [out, in] output, in the compute dtype
        return (full if columns is None else full[:, columns]).float()

    projection.base_weight_columns = four_bit
    return layers


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


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Liger's fused linear cross-entropy, by its algorithm: rows in chunks of Liger's size, each chunk's logits, their
    softmax gradient and its product back to the hidden states made in forward and dropped; only the hidden states'
    gradient ``[N, d]`` is kept for backward (the output layer is frozen under LoRA)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        rows, width = hidden.shape
        factor = math.ceil(weight.shape[0] / width)
        chunk = 2 ** math.ceil(math.log2(math.ceil(rows / factor)))  # liger_kernel's chunk_size
        grad_hidden = torch.empty_like(hidden)
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, rows, chunk):
            logits = (hidden[start:start + chunk] @ weight.T).float()
            probs = torch.softmax(logits, dim=-1)  # the kernel's in-place gradient of the chunk
            total = total + probs.sum() * 0
            grad_hidden[start:start + chunk] = (probs.to(hidden.dtype) @ weight)
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad.to(grad_hidden.dtype), None, None


def output_layer(model: nn.Module) -> nn.Module:
    """The MLLM's output layer (``lm_head``), PEFT-wrapped or not."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.lm_head


@dataclass
class HeraParts:
    """The plugin's own step parts for one model (built once, before sharding)."""

    capture: Any
    checkpointing: Any
    log_tau: nn.Parameter
    k: int
    lam: float
    similarity: str


def hera_parts(model: nn.Module, heads: list[str], recipe: dict) -> HeraParts:
    """``HeadCapture`` and ``LayerCheckpointing`` on ``model`` for ``heads``, with the recipe's hera_* settings."""
    from llamafactory_hera.heads.geometry import attention_geometry, parse_head
    from llamafactory_hera.hera.capture import HeadCapture
    from llamafactory_hera.training.layer_checkpointing import LayerCheckpointing

    refs = [parse_head(h) for h in heads]
    capture = HeadCapture(model, refs, attention_geometry(model.config))
    checkpointing = LayerCheckpointing(model, [ref.layer for ref in refs])
    log_tau = nn.Parameter(torch.tensor(math.log(recipe.get("hera_temperature", 0.07))))
    return HeraParts(capture, checkpointing, log_tau, int(recipe.get("hera_k", 10)), float(recipe["hera_lambda"]),
                     recipe.get("hera_similarity", "cosine"))


def hera_term(parts: HeraParts, reps: torch.Tensor, teacher_dim: int = 1024) -> torch.Tensor:
    """HeraTrainer.hera_term for a micro-batch whose samples are all anchors: the global batch gathered under
    ``hera_gather`` (the default) when distributed, the teacher's cached features."""
    from llamafactory_hera.hera.loss import _GatherWithGrad, distributed, hera_loss_anchored, used_temperature

    size = reps.shape[1]
    teacher = torch.empty(size, teacher_dim)
    candidates, candidate_teacher, offset = reps, teacher, 0
    if distributed():
        world = torch.distributed.get_world_size()
        candidates = _GatherWithGrad.apply(reps.contiguous())
        gathered = [torch.empty_like(teacher) for _ in range(world)]
        torch.distributed.all_gather(gathered, teacher)
        candidate_teacher = torch.cat(gathered)
    anchor_index = offset + torch.arange(size)
    k = min(parts.k, candidates.shape[1] - 1)
    per_anchor = hera_loss_anchored(reps, candidates, anchor_index, teacher, candidate_teacher, k,
                                    used_temperature(parts.log_tau), parts.similarity)
    return per_anchor.mean()


def step(model: nn.Module, config: Any, data: Batch, counter: Any, hera: HeraParts | None, liger: bool) -> None:
    """One micro-step: forward (with HeRA's capture, projection and loss when ``hera``), ``counter.mark()`` at the
    forward's end, backward. bf16 autocast, as the Trainer runs ``bf16: true``."""
    from llamafactory_hera.heads.pooling import pooling_weights

    inputs = dict(data.inputs)
    inputs["pixel_values"] = pixels(config, inputs["image_grid_thw"])
    labels = inputs.pop("labels")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if hera is not None:
            hera.checkpointing.ensure()
            hera.capture.arm()
        if liger:  # the output layer's call computes the loss, inside the root's call (FSDP2 gathers its weight)
            head = output_layer(model)
            head.forward = lambda hidden: ChunkedLinearCrossEntropy.apply(
                hidden[:, :-1].flatten(0, 1), head.weight, labels[:, 1:].flatten())
            try:
                loss = model(**inputs).logits
            finally:
                del head.forward
        else:
            loss = model(**inputs, labels=labels).loss
        if hera is not None:
            reps = hera.capture.disarm(pooling_weights(data.token_mask), check_gradient=True)
            loss = loss + hera.lam * hera_term(hera, reps)
    counter.mark()
    loss.backward()


@contextlib.contextmanager
def training_checkpointing(model: nn.Module) -> Any:
    """LLaMA-Factory's default: reentrant gradient checkpointing, inputs requiring grad (LoRA)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    model.train()
    yield model
