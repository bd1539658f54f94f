"""One training micro-step of a weightless model under fake tensors through the plugin's own code; bitsandbytes and
Liger are stood in for by their algorithm.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.nn import functional as F
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
from typing_extensions import override

from llamafactory_hera.harc.losses import kl_to_reference
from llamafactory_hera.heads.geometry import attention_geometry, parse_head
from llamafactory_hera.heads.pooling import pooling_weights
from llamafactory_hera.hera import projection
from llamafactory_hera.hera.capture import HeadCapture
from llamafactory_hera.hera.loss import hera_loss_anchored, used_temperature
from llamafactory_hera.plan.counter import StepFlops
from llamafactory_hera.plan.families import TOKEN_TYPES, images, part
from llamafactory_hera.training.layer_checkpointing import LayerCheckpointing


def build(config: Any) -> nn.Module:
    """``config``'s model in bf16, MLLM or text LLM (call under ``FakeTensorMode``)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        auto = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
        return auto.from_config(config)
    finally:
        torch.set_default_dtype(previous)


def add_lora(model: nn.Module, rank: int, alpha: int) -> nn.Module:
    """LLaMA-Factory's LoRA on every language-model linear layer (``lora_target: all``), trained weights in float32."""
    names = [
        name
        for name, m in model.named_modules()
        if type(m) is nn.Linear and part(name) == "language" and "lm_head" not in name
    ]
    move = nn.Module.to
    nn.Module.to = lambda self, *_, **__: self  # one device, one dtype: peft's moves are no-ops, and Module.to cannot
    try:  # swap a fake parameter that transformers' initialisation holds a weak reference to
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=names, lora_dropout=0.0))
    finally:
        nn.Module.to = move
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    return model


def set_trainable(model: nn.Module, parts: tuple[str, ...]) -> None:
    """A full fine-tune under freeze_* keys: ``parts``' parameters (:func:`families.part`) train."""
    for name, param in model.named_parameters():
        param.requires_grad_(part(name) in parts)


@dataclass
class Batch:
    """One micro-batch's real integer inputs and the shape of its fake pixels."""

    inputs: dict[str, Any]
    token_mask: torch.Tensor  # [B, S] the pooled (answer) tokens
    pixels: tuple[int, ...] | None = None


def batch(config: Any, size: int, seq: int, max_pixels: int) -> Batch:
    """``size`` rows of ``seq`` tokens, each with one square image of ``max_pixels`` or none; the text's second half
    is the answer."""
    image = images(config, max_pixels)
    ids = torch.full((size, seq), 100, dtype=torch.long)
    tokens = image.tokens if image else 0
    if image:
        ids[:, 4 : 4 + tokens] = getattr(config, "image_token_id", None) or config.image_token_index
    labels = ids.clone()
    labels[:, : (seq + tokens) // 2] = -100
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    inputs |= {key: torch.tensor([value] * size) for key, value in (image.inputs if image else {}).items()}
    if config.model_type in TOKEN_TYPES:
        inputs[TOKEN_TYPES[config.model_type]] = (ids == ids[0, 4]).long() if image else torch.zeros_like(ids)
    return Batch(inputs, labels != -100, (size * image.pixels[0], *image.pixels[1:]) if image else None)


class Dequantized(torch.autograd.Function):
    """bitsandbytes' 4-bit product: the weight dequantized (a clone) in forward and again in backward."""

    @staticmethod
    @override
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return F.linear(x, weight.clone().to(x.dtype), bias)

    @staticmethod
    @override
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        (weight,) = ctx.saved_tensors
        return grad @ weight.clone().to(grad.dtype), None, None


UNQUANTIZED_COLUMNS = projection.base_weight_columns


def four_bit_columns(base: nn.Module, columns: torch.Tensor | None = None) -> torch.Tensor:
    """``base_weight_columns`` for a 4-bit layer: the whole weight dequantized in bf16, the heads' columns cast to
    float32."""
    if not getattr(base, "four_bit", False):
        return UNQUANTIZED_COLUMNS(base, columns)
    full = base.weight.detach().clone()  # dequantize_4bit's [out, in] output, in the compute dtype
    return (full if columns is None else full[:, columns]).float()


def quantize_in_place(model: nn.Module) -> list[nn.Linear]:
    """Every base ``nn.Linear`` but the output layer through :class:`Dequantized`; those layers."""
    layers = [
        m for name, m in model.named_modules() if type(m) is nn.Linear and "lm_head" not in name and "lora_" not in name
    ]
    for layer in layers:
        layer.forward = (lambda m: lambda x: Dequantized.apply(x, m.weight, m.bias))(layer)
        layer.four_bit = True
    projection.base_weight_columns = four_bit_columns
    return layers


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Liger's fused linear cross-entropy: per chunk, logits and their gradient made in forward and dropped; only the
    hidden states' gradient ``[N, d]`` is kept."""

    @staticmethod
    @override
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        rows, width = hidden.shape
        factor = math.ceil(weight.shape[0] / width)
        chunk = 2 ** math.ceil(math.log2(math.ceil(rows / factor)))  # liger_kernel's chunk_size
        grad_hidden = torch.empty_like(hidden)
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, rows, chunk):
            logits = (hidden[start : start + chunk] @ weight.T).float()
            probs = torch.softmax(logits, dim=-1)  # the kernel's in-place gradient of the chunk
            total = total + probs.sum() * 0
            grad_hidden[start : start + chunk] = probs.to(hidden.dtype) @ weight
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    @override
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad.to(grad_hidden.dtype), None, None


def output_layer(model: nn.Module) -> nn.Module:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.lm_head


@dataclass
class HeraParts:
    """HeRA's step parts for one model (built once, before sharding)."""

    capture: Any
    checkpointing: Any
    log_tau: nn.Parameter
    k: int
    lam: float
    similarity: str
    candidates: int  # the contrastive set: the gathered batch set and the queue (0: the micro-batch alone)


def hera_parts(model: nn.Module, heads: list[str], recipe: dict) -> HeraParts:
    """``HeadCapture`` and ``LayerCheckpointing`` for ``heads``, with the recipe's hera_* settings."""
    refs = [parse_head(h) for h in heads]
    capture = HeadCapture(model, refs, attention_geometry(model.config))
    checkpointing = LayerCheckpointing(model, [ref.layer for ref in refs])
    log_tau = nn.Parameter(torch.tensor(math.log(recipe.get("hera_temperature", 0.07))))
    return HeraParts(
        capture,
        checkpointing,
        log_tau,
        int(recipe.get("hera_k", 10)),
        float(recipe["hera_lambda"]),
        recipe.get("hera_similarity", "cosine"),
        int(recipe.get("hera_candidates", 0)),
    )


def hera_term(parts: HeraParts, reps: torch.Tensor, teacher_dim: int = 1024) -> torch.Tensor:
    """HeraTrainer.hera_term at one rank, every sample an anchor, against cached teacher features; the candidates
    beyond the micro-batch stand in without gradient."""
    size = reps.shape[1]
    others = max(parts.candidates - size, 0)
    candidates = torch.cat([reps, reps.new_zeros(reps.shape[0], others, reps.shape[2])], 1) if others else reps
    teacher = torch.empty(candidates.shape[1], teacher_dim)
    anchor_teacher = teacher[:size] if others else teacher  # one tensor: normalised once, as in training
    return hera_loss_anchored(
        reps,
        candidates,
        torch.arange(size),
        anchor_teacher,
        teacher,
        min(parts.k, candidates.shape[1] - 1),
        used_temperature(parts.log_tau),
        parts.similarity,
    ).mean()


def step(
    model: nn.Module,
    data: Batch,
    counter: Any,
    hera: HeraParts | None,
    liger: bool,
    term: Callable[[HeraParts, torch.Tensor], torch.Tensor] = hera_term,
    reference_rows: int = 0,
    probe: str | None = None,
) -> int:
    """One bf16-autocast micro-step: forward (``reference_rows``: HARC's no-grad KL to the adapter-disabled model),
    ``counter.mark()``, backward; ``probe``: RAH-LoRA's passes instead. Returns HARC's reference FLOPs."""
    inputs = dict(data.inputs)
    if data.pixels:
        inputs["pixel_values"] = torch.empty(data.pixels, dtype=torch.bfloat16)
    labels = inputs.pop("labels")
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(probe != "isal"):
        if hera is not None:
            hera.checkpointing.ensure()
            hera.capture.arm()
        if probe:
            loss = model(**inputs, output_attentions=probe == "isal").logits[:, -1].float().logsumexp(-1).sum()
        elif liger:  # the output layer computes the loss, inside the root's call (FSDP2 gathers its weight)
            head = output_layer(model)
            head.forward = lambda hidden: ChunkedLinearCrossEntropy.apply(
                hidden[:, :-1].flatten(0, 1), head.weight, labels[:, 1:].flatten()
            )
            try:
                loss = model(**inputs).logits
            finally:
                del head.forward
        else:
            out = model(**inputs, labels=labels)
            loss = out.loss
            logits = out.logits[:reference_rows] if reference_rows else None  # HARC's KL reads them
            del out
        with StepFlops() as reference:
            if reference_rows:
                retain = {key: value[:reference_rows] for key, value in inputs.items()}
                with torch.no_grad(), model.disable_adapter():
                    reference_logits = model(**retain).logits
                loss = loss + kl_to_reference(logits, reference_logits, data.token_mask[:reference_rows])
        if hera is not None:
            reps = hera.capture.disarm(pooling_weights(data.token_mask), check_gradient=True)
            loss = loss + hera.lam * term(hera, reps)
    counter.mark()
    if probe != "isal":
        loss.backward()
    return reference.get_total_flops()


def train_mode(model: nn.Module, checkpointing: bool) -> None:
    """Training mode, inputs requiring grad; ``checkpointing``: reentrant, of layers with a trainable parameter, as
    LLaMA-Factory does."""
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        for module in model.modules():
            if getattr(module, "gradient_checkpointing", False) and not any(
                p.requires_grad for p in module.parameters()
            ):
                module.gradient_checkpointing = False
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    model.train()
