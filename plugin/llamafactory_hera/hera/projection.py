"""The heads' representations: their ``o_proj`` inputs captured in the LM forward (:class:`HeadCapture`, steps 2-3
of the HeRA step) and projected per head through ``o_proj`` (paper Eq. 6–7, App. A).

``o_proj`` is a linear map with weight ``[d, H * d_head]``; the input ``[.., H * d_head]`` is
head-major, so head h owns input columns ``h*d_head:(h+1)*d_head`` and its contribution to the
residual stream is ``x[.., h-slice] @ W[:, h-slice].T`` (bias excluded). With LoRA the effective
weight ``W + scaling * B @ A`` is used, restricted to the same columns; with DoRA ``diag(m / ||W + s B A||_row)``
scales its rows. ``W`` is read as the layer's forward uses it: bitsandbytes 4-bit and 8-bit weights dequantized
(:func:`base_weight_columns`).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable

import torch
from torch import nn

from llamafactory_hera.heads.architecture import head_projections, trainable_upstream
from llamafactory_hera.heads.geometry import AttentionGeometry, HeadRef
from llamafactory_hera.hera.sharded_4bit import sharded_columns
from llamafactory_hera.short_errors import RecipeError


def effective_weight_columns(o_proj: nn.Module, columns: torch.Tensor) -> torch.Tensor:
    """``[d, C]`` effective weight of ``o_proj`` (``nn.Linear``, a bitsandbytes 4-/8-bit ``Linear``, or a PEFT LoRA /
    DoRA layer wrapping one) at the ``[C]`` input ``columns``: what the layer multiplies those inputs by, bias excluded,
    summed in float32 with the delta of every active, unmerged adapter.

    Adapter n adds ``s B A`` (LoRA) or, with DoRA (PEFT's: one magnitude per *output row*), ``(c - 1) W + c s B A``
    with ``c = m / ||W + s B A||_row`` (the norm over the full row, every column; detached, as PEFT's forward does), so
    one DoRA adapter gives ``diag(c) (W + s B A)``: a head's contribution stays its columns times its input. (Each
    adapter's delta is taken on the base weight, as LLaMA-Factory trains one adapter; PEFT applies a second active DoRA
    adapter to the first one's result.)

    The base weight and each delta are cast to float32 before they are added: in bf16 a LoRA delta a few 1e-5 of the
    weight (early in training) is mostly rounded away by the sum (at |delta|/|W| = 7e-5, 98.6 % of its effect on the
    projected value).
    """
    base, adapters = _base_and_adapters(o_proj)
    if base.weight.ndim != 2:  # a ZeRO-3 partition outside its gather: an empty 1-D placeholder
        raise RuntimeError("o_proj's weight is a DeepSpeed ZeRO-3 partition; read it inside "
                           "deepspeed.zero.GatheredParameters, or project through project_heads_by_call.")
    weight = base_weight_columns(base, columns)
    total = weight
    for name in adapters:
        lora_a = whole(o_proj.lora_A[name].weight, columns).float()  # [r, C]
        lora_b = whole(o_proj.lora_B[name].weight).float()  # [d, r]
        scaling = o_proj.scaling[name]
        delta = scaling * (lora_b @ lora_a)
        if o_proj.use_dora.get(name, False):
            magnitude = whole(o_proj.lora_magnitude_vector[name].weight)
            norm = _dora_norm(base, o_proj.lora_A[name].weight, o_proj.lora_B[name].weight, scaling)
            row = (magnitude.float() / norm)[:, None]
            delta = (row - 1) * weight + row * delta
        total = total + delta
    return total


def _dora_norm(base: nn.Module, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``[d]``: DoRA's ``||W + s B A||_row``, detached. Under FSDP2 (a floating weight) each rank takes the norms of
    its own rows (``W`` and ``B`` are sharded alike, by rows) with ``A`` whole, and the ``[d]`` norms are gathered:
    no whole ``W`` moves."""
    weight = base.weight
    with torch.no_grad():
        if _quant_state(base) is None and hasattr(weight, "full_tensor") and hasattr(lora_b, "to_local"):
            from torch.distributed.tensor import DTensor  # lazy: only a DTensor gets here

            device = weight.device_mesh.device_type  # offloaded shards (fsdp_offload_params) are read there
            local = dora_row_norm(weight.to_local().to(device).float(), scaling * (
                lora_b.to_local().to(device).float() @ whole(lora_a.detach()).float()))
            return DTensor.from_local(local, weight.device_mesh, weight.placements, run_check=False,
                                      shape=weight.shape[:1], stride=(1,)).full_tensor()
        return dora_row_norm(base_weight_columns(base), scaling * (whole(lora_b).float() @ whole(lora_a).float()))


def base_weight_columns(base: nn.Module, columns: torch.Tensor | None = None) -> torch.Tensor:
    """``[out, C]`` float32 weight of a base ``Linear`` at input ``columns`` (all when None), as its forward uses it:
    a plain weight as stored; bitsandbytes 8-bit (``Int8Params``) as ``codes * SCB / 127`` (per-row absmax ``SCB``);
    bitsandbytes 4-bit (``Params4bit``, packed with a ``quant_state``: nf4, fp4, double quantization) dequantized whole
    (its blocks run along the flattened rows) and then indexed; under FSDP2 each rank's shard of whole rows and blocks
    dequantized and indexed alone, the columns gathered (:func:`~.sharded_4bit.sharded_columns`), other shards
    gathered whole first. Any other non-floating storage is refused by name.
    (bitsandbytes 0.50's 8-bit layer on the CPU multiplies by exactly this weight in train mode, as HeRA trains; in
    eval mode, e.g. ``select``, it runs LLM.int8, its inputs rounded to float16 and int8 per row, ~7e-3 relative:
    the heads then sum to the layer's output within that rounding.)"""
    weight = base.weight
    quant_state = _quant_state(base)
    if quant_state is not None:
        if getattr(quant_state, "packing_format_for_cpu", False):  # never read a layout dequantize_4bit does not
            raise RuntimeError(
                "o_proj's 4-bit weight is in bitsandbytes' CPU inference layout (repacked by an eval-mode forward "
                "without gradient on a CPU with AVX512-BF16), which dequantize_4bit does not read; run the model's "
                "eval forwards under llamafactory_hera.training.eval_forward.keep_4bit_layout.")
        # lazy: bitsandbytes is installed only where a model was loaded 4-bit with it
        from bitsandbytes.functional import dequantize_4bit

        storage = getattr(base, "quant_storage", weight.dtype)
        if weight.dtype != storage:  # its bytes are no longer the codes
            raise RuntimeError(f"o_proj's 4-bit weight is stored as {weight.dtype}, not as its packed storage "
                               f"{storage}: something converted the codes as numbers (accelerate's FSDP2 "
                               "mixed-precision upcast does, unless llamafactory_hera_patches.engines.fsdp_qlora "
                               "keeps them out of it).")
        if columns is not None and (sharded := sharded_columns(weight, quant_state, columns)) is not None:
            return sharded.float()  # under FSDP2, shards of whole rows and blocks: each rank's columns gathered
        full = dequantize_4bit(whole(weight).detach(), quant_state)  # [out, in]; a shard otherwise gathered whole
        return (full if columns is None else full[:, columns]).float()
    if weight.dtype == torch.int8:
        scb = getattr(weight, "SCB", None)
        if scb is None:
            scb = getattr(getattr(base, "state", None), "SCB", None)
        if scb is None:
            raise TypeError(f"o_proj's base {type(base).__name__} holds int8 codes without their row scales (SCB); "
                            "llamafactory-hera cannot read its weight.")
        codes = weight.data if columns is None else weight.data[:, columns]
        return codes.float() * (scb.float()[:, None] * (1.0 / 127.0))  # bitsandbytes' own order of operations
    if not weight.dtype.is_floating_point:
        raise TypeError(f"o_proj's base {type(base).__name__} stores its weight as {weight.dtype}, a quantization "
                        "llamafactory-hera cannot read exactly; use bitsandbytes (quantization_bit: 4 or 8) or an "
                        "unquantized model.")
    return whole(weight, columns).float()  # an FSDP2 shard: only the columns gathered


def _quant_state(base: nn.Module) -> object | None:
    """The bitsandbytes 4-bit ``QuantState`` of ``base``'s weight, None for any other layer. It rides on the weight
    (``Params4bit``); under FSDP2 the weight is a DTensor of the packed storage that lost it, and bitsandbytes keeps it
    on the layer (``Linear4bit.quant_state``, which its own forward puts back on the weight)."""
    quant_state = getattr(base.weight, "quant_state", None)
    return quant_state if quant_state is not None else getattr(base, "quant_state", None)


def dora_row_norm(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``[out]``: ``||W + delta||_row``, detached, for a ``[out, in]`` float32 ``weight`` and scaled LoRA ``delta``."""
    return torch.linalg.norm(weight + delta.detach(), dim=1).detach()


def whole(weight: torch.Tensor, columns: torch.Tensor | None = None) -> torch.Tensor:
    """``weight`` whole, or its ``[:, columns]`` (a 2-D weight). Under FSDP2 a parameter outside its module's forward
    is a DTensor holding this rank's rows: each rank's rows at ``columns`` are gathered, no other column (a collective:
    every rank reads the same weights in the same order), and the gradient goes back to the shards averaged over the
    data-parallel ranks (``Partial("avg")``: the backward reduce-scatters the rows' gradients with their mean), as
    FSDP2 averages the gradients of its own forward (a sum would scale this term's update by the number of ranks).
    With FSDP2's CPU offload (``fsdp_offload_params: true``) the shard lives in host memory while the ranks gather on
    their accelerator: it is moved there first, as torch's own full state-dict gather does
    (``torch.distributed._state_dict_utils``), its gradient going back to the host shard. Any other tensor is
    indexed as it is."""
    if not hasattr(weight, "full_tensor"):
        return weight if columns is None else weight[:, columns]
    from torch.distributed.tensor import DTensor, Partial  # lazy: only a DTensor gets here

    if weight.device.type != weight.device_mesh.device_type:
        weight = weight.to(weight.device_mesh.device_type)
    if columns is not None and any(p.is_shard() and p.dim != 0 for p in weight.placements):
        return whole(weight)[:, columns]  # sharded otherwise than by rows (never by FSDP2): whole, then indexed
    if columns is not None:  # the rows' columns, a DTensor sharded as the weight is (to_local, from_local: autograd)
        local = weight.to_local()[:, columns.to(weight.device)]
        weight = DTensor.from_local(local, weight.device_mesh, weight.placements, run_check=False,
                                    shape=(weight.shape[0], len(columns)), stride=(len(columns), 1))
    return weight.full_tensor(grad_placements=[Partial("avg")] * len(weight.placements))


def _base_and_adapters(o_proj: nn.Module) -> tuple[nn.Linear, list[str]]:
    """(the Linear holding ``W_O``, plain or bitsandbytes-quantized, the names of the LoRA / DoRA adapters whose
    delta adds to it: none for a plain ``o_proj``, or when merged or disabled)."""
    base = getattr(o_proj, "base_layer", None)
    if base is None:
        if not isinstance(o_proj, nn.Linear):
            raise TypeError(f"o_proj is a {type(o_proj).__name__}; llamafactory-hera supports nn.Linear and "
                            "LoRA-wrapped Linear.")
        return o_proj, []
    if not isinstance(base, nn.Linear) or len(_full_shape(getattr(base, "weight", None))) != 2:
        raise TypeError(
            f"o_proj wraps a {type(base).__name__}; llamafactory-hera reads W_O from a Linear base layer (plain, or "
            "bitsandbytes 4-bit / 8-bit)."
        )
    if getattr(o_proj, "merged", False) or getattr(o_proj, "disable_adapters", False):
        return base, []
    return base, [name for name in o_proj.active_adapters if name in o_proj.lora_A]


def _full_shape(weight: torch.Tensor | None) -> tuple[int, ...]:
    """The shape of ``weight`` as the model defines it: a DeepSpeed ZeRO-3 partition (a ``ds_id``) keeps it in
    ``ds_shape`` (outside a gather its data is an empty 1-D placeholder); () for no weight."""
    if weight is None:
        return ()
    return tuple(weight.ds_shape) if hasattr(weight, "ds_id") else tuple(weight.shape)


def head_columns(heads: list[int], head_dim: int, device: torch.device | None = None) -> torch.Tensor:
    """``[len(heads) * head_dim]`` input-column indices of ``heads`` (head-major)."""
    offsets = torch.arange(head_dim, device=device)
    return torch.cat([h * head_dim + offsets for h in heads])


def project_heads(o_proj: nn.Module, x_heads: torch.Tensor, heads: list[int], head_dim: int) -> torch.Tensor:
    """``[len(heads), ..., d]``: each head's contribution to the residual stream, its slice of ``x_heads``
    ``[..., len(heads) * head_dim]`` (the ``o_proj`` input's slices for ``heads``, in that order) through its ``W_O``
    columns, in float32 (inputs and weight cast). Over every head they sum to ``o_proj(x) - bias`` (LoRA dropout
    aside)."""
    columns = head_columns(heads, head_dim, x_heads.device)
    w_sel = effective_weight_columns(o_proj, columns).unflatten(-1, (len(heads), head_dim))  # [d, n, dh] float32
    x_sel = x_heads.float().unflatten(-1, (len(heads), head_dim))  # [..., n, dh]
    return torch.einsum("...nk,dnk->n...d", x_sel, w_sel)


def is_partitioned(o_proj: nn.Module) -> bool:
    """True when ``o_proj``'s weight is a DeepSpeed ZeRO-3 partition (only gathered inside the module's forward)."""
    base = getattr(o_proj, "base_layer", o_proj)
    return hasattr(getattr(base, "weight", None), "ds_id")


def project_heads_by_call(o_proj: nn.Module, x_heads: torch.Tensor, heads: list[int], head_dim: int,
                          width: int) -> torch.Tensor:
    """Like :func:`project_heads`, but inside calls of ``o_proj``'s modules (for ZeRO-3 partitioned weights).

    A ZeRO-3 weight is whole only inside its module's call (the module's hooks gather it, and gather it again
    for backward). So the base layer, and each active LoRA adapter's ``lora_A`` and ``lora_B``, is called with
    its ``forward`` swapped for the float32 product of the head columns of its own weight (a bitsandbytes 4-bit base,
    ZeRO-3 + QLoRA, read dequantized by :func:`base_weight_columns` inside its call). The result is
    :func:`project_heads`'s ``x @ (W + s B A)^T`` computed as ``x W^T + s (x A^T) B^T``, all in float32: the two
    paths differ by float32 rounding only. A DoRA adapter adds ``(c - 1) x W^T + c s (x A^T) B^T`` with
    ``c = m / ||W + s B A||_row``: the row norm, detached as in PEFT's forward, is read with the layer's weights
    gathered at once (:func:`gathered`, a collective), the magnitude ``m`` in a call of its own module, so its
    gradient goes back through ZeRO-3's hooks. LoRA dropout is not applied (as in the effective-weight path).
    ``x_heads``: ``[B, len(heads) * head_dim]`` pooled head inputs; ``width``: ``num_heads * head_dim``, the input
    width of ``o_proj`` (checked against the weight). Returns ``[len(heads), B, d]`` float32 contributions.
    """
    base, adapters = _base_and_adapters(o_proj)
    if base.in_features != width:
        raise ValueError(f"o_proj takes {base.in_features} inputs, expected num_heads * head_dim = {width}")
    columns = head_columns(heads, head_dim, x_heads.device)
    x = x_heads.float().unflatten(-1, (len(heads), head_dim))  # [B, n, dh]

    def through(module: nn.Module, x: torch.Tensor) -> torch.Tensor:  # [B, n, dh] -> [n, B, rows of weight]
        weight = base_weight_columns(module, columns).unflatten(-1, (len(heads), head_dim))  # [out, n, dh]
        return torch.einsum("bnk,onk->nbo", x, weight)

    through_base = _call_as(base, through, x)  # [n, B, d]
    norms = _dora_row_norms(o_proj, base, [name for name in adapters if o_proj.use_dora.get(name, False)])
    out = through_base
    for name in adapters:
        low = _call_as(o_proj.lora_A[name], through, x)  # [n, B, r]
        lora = o_proj.scaling[name] * _call_as(o_proj.lora_B[name], lambda m, z: z @ m.weight.float().T, low)
        if name in norms:  # DoRA: c = m / ||W + s B A||_row, [d]
            row = _call_as(o_proj.lora_magnitude_vector[name], lambda m, norm: m.weight.float() / norm, norms[name])
            lora = (row - 1) * through_base + row * lora
        out = out + lora
    return out


def _dora_row_norms(o_proj: nn.Module, base: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """``{adapter: [d]}``: ``||W + s B A||_row`` of each DoRA adapter in ``names``, detached (PEFT's forward), read with
    all of ``o_proj``'s weights gathered at once."""
    if not names:
        return {}
    with gathered(o_proj):
        return {name: _dora_norm(base, o_proj.lora_A[name].weight, o_proj.lora_B[name].weight, o_proj.scaling[name])
                for name in names}


def gathered(module: nn.Module) -> contextlib.AbstractContextManager:
    """Context in which a ZeRO-3 partitioned module's parameters are whole (a collective: every rank enters it); a
    no-op for a module without any."""
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed  # lazy: an optional install, only under ZeRO-3

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def _call_as(module: nn.Module, compute: Callable[[nn.Module, torch.Tensor], torch.Tensor],
             x: torch.Tensor) -> torch.Tensor:
    """``compute(module, x)`` run as ``module``'s forward, through ``module(x)``: its hooks (ZeRO-3's gathering of
    its parameters, in forward and backward) act as in an ordinary call."""
    own = module.__dict__.get("forward")
    module.forward = lambda inputs: compute(module, inputs)
    try:
        return module(x)
    finally:
        if own is None:
            del module.forward
        else:
            module.forward = own


class HeadCapture:
    """Forward hooks that produce ``[n_heads, B, d]`` head representations for one forward pass.

    A forward hook on each selected layer's ``o_proj`` copies the selected heads' slices of its input
    (``[B, T, n*d_head]``; slicing and concatenation save no tensors for backward, so gradient
    checkpointing's recomputation sees the same saved tensors with or without the hook). After the
    forward, the slices are pooled over the chosen tokens and projected through each head's ``W_O``
    columns, outside any checkpointed region, so the HeRA loss has a full autograd graph.
    Hooks act only while armed: recomputation during backward and evaluation forwards are ignored.
    """

    def __init__(self, model: nn.Module, heads: list[HeadRef], geometry: AttentionGeometry) -> None:
        self.heads = list(heads)
        self.geometry = geometry
        o_projs = head_projections(model)
        missing = sorted({ref.layer for ref in heads} - set(o_projs))
        if missing:
            raise ValueError(f"decoder layer(s) {missing} of the loaded model have no heads (layers with heads: "
                             f"{sorted(o_projs)}); the config's plan said {list(geometry.head_layers)}")
        self._by_layer: dict[int, list[int]] = defaultdict(list)
        for ref in self.heads:
            self._by_layer[ref.layer].append(ref.head)
        self._modules = {layer: o_projs[layer] for layer in self._by_layer}
        self._armed = False
        self._inputs: dict[int, torch.Tensor] = {}
        self.fed_by_trainable = trainable_upstream(model, sorted(self._by_layer))
        for layer in sorted(self._by_layer):
            self._modules[layer].register_forward_hook(self._make_hook(layer))

    def _make_hook(self, layer: int):
        dh = self.geometry.head_dim_of(layer)
        slices = [slice(h * dh, (h + 1) * dh) for h in self._by_layer[layer]]

        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if self._armed:
                x = args[0]  # [B, T, H*dh]
                self._inputs[layer] = torch.cat([x[..., s] for s in slices], dim=-1)  # [B, T, n*dh], a copy

        return hook

    def arm(self) -> None:
        """Capture the next forward pass."""
        self._armed = True
        self._inputs = {}

    def disarm(self, weights: torch.Tensor, check_gradient: bool = False) -> torch.Tensor | None:
        """Stop capturing and build the representations.

        Args:
            weights: ``[B, T]`` float pooling weights (rows sum to 1, or 0 for samples without tokens).
            check_gradient: in a training step, raise if a captured input that trainable parameters feed
                carries no gradient (a silently cut HeRA gradient).

        Returns:
            ``[n_heads, B, d]`` float32 in recipe order, or None if no hook fired.
        """
        self._armed = False
        inputs, self._inputs = self._inputs, {}
        if not inputs:
            return None
        missing = sorted(set(self._by_layer) - set(inputs))
        if missing:
            raise RuntimeError(f"o_proj of layers {missing} did not run in this forward pass")
        # scanned on the checked steps only
        if check_gradient and (cut := [layer for layer, x in sorted(inputs.items())
                                       if self.fed_by_trainable[layer] and not x.requires_grad]):
            raise RecipeError(
                f"HeRA: the o_proj input of layer(s) {cut} carries no gradient although trainable parameters feed "
                "it, so the HeRA gradient would reach only the selected heads' W_O columns. The forward ran without "
                "autograd: a gradient checkpointing that runs that layer under torch.no_grad (use_unsloth_gc, or a "
                "custom checkpointing function HeRA cannot make non-reentrant) is the usual cause. "
                "Remove use_unsloth_gc / set use_reentrant_gc: false.")
        reps: dict[HeadRef, torch.Tensor] = {}
        for layer, x_heads in inputs.items():
            if x_heads.shape[:2] != weights.shape:
                raise RuntimeError(
                    f"o_proj input of layer {layer} has shape {tuple(x_heads.shape)} but the pooling mask is "
                    f"{tuple(weights.shape)}; the model changes the sequence length internally."
                )
            pooled = torch.einsum("bt,btc->bc", weights.to(x_heads.device, torch.float32), x_heads.float())
            heads = self._by_layer[layer]
            module = self._modules[layer]
            head_dim = self.geometry.head_dim_of(layer)
            if is_partitioned(module):  # DeepSpeed ZeRO-3: let the module's hooks gather its weights
                projected = project_heads_by_call(module, pooled, heads, head_dim, self.geometry.num_heads * head_dim)
            else:
                projected = project_heads(module, pooled, heads, head_dim)  # [n, B, d]
            reps.update({HeadRef(layer, h): rep for h, rep in zip(heads, projected, strict=True)})
        return torch.stack([reps[ref] for ref in self.heads])
