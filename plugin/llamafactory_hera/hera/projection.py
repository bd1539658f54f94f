"""The heads' representations: their ``o_proj`` inputs (captured in the LM forward, hera/capture.py) projected per
head through ``o_proj`` (paper Eq. 6–7, App. A).

``o_proj`` is a linear map with weight ``[d, H * d_head]``; the input ``[.., H * d_head]`` is
head-major, so head h owns input columns ``h*d_head:(h+1)*d_head`` and its contribution to the
residual stream is ``x[.., h-slice] @ W[:, h-slice].T`` (bias excluded). With LoRA the effective
weight ``W + scaling * B @ A`` is used, restricted to the same columns; with DoRA ``diag(m / ||W + s B A||_row)``
scales its rows. ``W`` is read as the layer's forward uses it: bitsandbytes 4-bit and 8-bit weights dequantized
(:func:`base_weight_columns`).
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
from torch import nn


def effective_weight_columns(o_proj: nn.Module, columns: torch.Tensor) -> torch.Tensor:
    """``[d, C]`` effective weight of ``o_proj`` (``nn.Linear``, a bitsandbytes 4-/8-bit ``Linear``, or a PEFT LoRA /
    DoRA layer wrapping one) at the ``[C]`` input ``columns``: what the layer multiplies those inputs by, bias excluded,
    summed in float32 with the delta of every active, unmerged adapter.

    Each adapter's delta (:func:`combined`; DoRA's row norm over the full row, detached, as PEFT's forward takes it)
    is taken on the base weight, as LLaMA-Factory trains one adapter (PEFT applies a second active DoRA adapter to the
    first one's result): one DoRA adapter gives ``diag(c) (W + s B A)``, a head's contribution its columns times its
    input.

    The base weight and each delta are cast to float32 before they are added: in bf16 a LoRA delta a few 1e-5 of the
    weight (early in training) is mostly rounded away by the sum (at |delta|/|W| = 7e-5, 98.6 % of its effect on the
    projected value).
    """
    base, adapters = base_and_adapters(o_proj)
    if base.weight.ndim != 2:  # a ZeRO-3 partition outside its gather: an empty 1-D placeholder
        raise RuntimeError(
            "o_proj's weight is a DeepSpeed ZeRO-3 partition; read it inside "
            "deepspeed.zero.GatheredParameters, or in its modules' calls (hera/capture.py)."
        )
    weight = base_weight_columns(base, columns)
    deltas = []
    for name in adapters:
        lora_a = whole(o_proj.lora_A[name].weight, columns).float()  # [r, C]
        lora_b = whole(o_proj.lora_B[name].weight).float()  # [d, r]
        scaling = o_proj.scaling[name]
        dora = None
        if o_proj.use_dora.get(name, False):
            dora = (
                whole(o_proj.lora_magnitude_vector[name].weight),
                _dora_norm(base, o_proj.lora_A[name].weight, o_proj.lora_B[name].weight, scaling),
            )
        deltas.append(AdapterColumns(lora_a, lora_b, scaling, dora))
    return combined(weight, deltas)


class AdapterColumns(NamedTuple):
    """One adapter's part of the effective weight at the heads' columns: ``lora_a`` ``[r, C]`` and ``lora_b``
    ``[d, r]`` float32, its ``scaling``, and for DoRA ``(magnitude [d], row norm [d])``, else None."""

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scaling: float
    dora: tuple[torch.Tensor, torch.Tensor] | None


def combined(weight: torch.Tensor, adapters: list[AdapterColumns]) -> torch.Tensor:
    """``[d, C]`` float32: the base ``weight`` columns ``[d, C]`` plus each adapter's delta, ``s B A`` (LoRA) or
    ``(c - 1) W + c s B A`` with ``c = m / ||W + s B A||_row`` (DoRA)."""
    total = weight
    for adapter in adapters:
        if adapter.dora is None:  # W + s B A in one op (a step's fewest launches)
            total = torch.addmm(total, adapter.lora_b, adapter.lora_a, alpha=adapter.scaling)
            continue
        delta = adapter.scaling * (adapter.lora_b @ adapter.lora_a)
        magnitude, norm = adapter.dora
        row = (magnitude.float() / norm)[:, None]
        total = total + ((row - 1) * weight + row * delta)
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
            local = dora_row_norm(
                weight.to_local().to(device),
                lora_b.to_local().to(device).float() @ whole(lora_a.detach()).float(),
                scaling,
            )
            return DTensor.from_local(
                local, weight.device_mesh, weight.placements, run_check=False, shape=weight.shape[:1], stride=(1,)
            ).full_tensor()
        return dora_row_norm(base_weight_columns(base), whole(lora_b).float() @ whole(lora_a).float(), scaling)


def base_weight_columns(base: nn.Module, columns: torch.Tensor | None = None) -> torch.Tensor:
    """``[out, C]`` float32 weight of a base ``Linear`` at input ``columns`` (all when None), as its forward uses it:
    a plain weight as stored; bitsandbytes 8-bit (``Int8Params``) as ``codes * SCB / 127`` (per-row absmax ``SCB``);
    bitsandbytes 4-bit (``Params4bit``, packed with a ``quant_state``: nf4, fp4, double quantization) dequantized whole
    (its blocks run along the flattened rows) and then indexed; under FSDP2 each rank's shard of whole rows and blocks
    dequantized and indexed alone, the columns gathered (:func:`sharded_columns`), other shards
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
                "eval forwards under llamafactory_hera.training.eval_forward.keep_4bit_layout."
            )
        # lazy: bitsandbytes is installed only where a model was loaded 4-bit with it
        from bitsandbytes.functional import dequantize_4bit

        storage = getattr(base, "quant_storage", weight.dtype)
        if weight.dtype != storage:  # its bytes are no longer the codes
            raise RuntimeError(
                f"o_proj's 4-bit weight is stored as {weight.dtype}, not as its packed storage "
                f"{storage}: something converted the codes as numbers (accelerate's FSDP2 "
                "mixed-precision upcast does, unless llamafactory_hera_patches.engines.fsdp_qlora "
                "keeps them out of it)."
            )
        if columns is not None and (sharded := sharded_columns(weight, quant_state, columns)) is not None:
            return sharded.float()  # under FSDP2, shards of whole rows and blocks: each rank's columns gathered
        full = dequantize_4bit(whole(weight).detach(), quant_state)  # [out, in]; a shard otherwise gathered whole
        return (full if columns is None else full[:, columns]).float()
    if weight.dtype == torch.int8:
        scb = getattr(weight, "SCB", None)
        if scb is None:
            scb = getattr(getattr(base, "state", None), "SCB", None)
        if scb is None:
            raise TypeError(
                f"o_proj's base {type(base).__name__} holds int8 codes without their row scales (SCB); "
                "llamafactory-hera cannot read its weight."
            )
        codes = weight.data if columns is None else weight.data[:, columns]
        return codes.float() * (scb.float()[:, None] * (1.0 / 127.0))  # bitsandbytes' own order of operations
    if not weight.dtype.is_floating_point:
        raise TypeError(
            f"o_proj's base {type(base).__name__} stores its weight as {weight.dtype}, a quantization "
            "llamafactory-hera cannot read exactly; use bitsandbytes (quantization_bit: 4 or 8) or an "
            "unquantized model."
        )
    return whole(weight, columns).float()  # an FSDP2 shard: only the columns gathered


def sharded_columns(weight: torch.Tensor, quant_state: object, columns: torch.Tensor) -> torch.Tensor | None:
    """``[out, C]`` of the 4-bit weight at input ``columns`` ``[C]``, in the dequantized dtype (``quant_state.dtype``),
    bit for bit what ``dequantize_4bit`` of the whole packed weight gives there; no gradient (a frozen base). None
    when ``weight`` is not an FSDP2 shard (a DTensor ``Shard(0)`` on a 1-D mesh) of whole rows of whole blocks, or when
    the columns would move more bytes than the packed weight (many heads of a layer): the caller gathers it whole.
    Decided from global shapes only, so every rank takes the same path and issues the same collectives.

    bitsandbytes packs a ``[out, in]`` weight row-major into ``[out * in / k, 1]`` elements of its storage dtype (``k``
    4-bit codes each: 2 per byte; ``k = 4`` in bf16, the storage LLaMA-Factory sets under FSDP), quantized in blocks of
    ``blocksize`` consecutive codes, one absmax each (the ``QuantState``, whole on every rank: it stays on the layer).
    FSDP2 shards the storage's dim 0 as ``torch.chunk`` does: ``chunk = ceil(M / world)`` elements, rank i holding
    ``[i * chunk, min((i + 1) * chunk, M))`` (the last ones short or empty). When ``chunk * k`` codes are whole rows
    and ``in`` whole blocks (bitsandbytes' CPU kernel on AVX-512 reads row r's blocks from ``r * (in // blocksize)``),
    rank i's shard is rows ``[i * chunk * k / in, ...)``: dequantized there, its ``[rows, C]`` gathered."""
    if (
        not hasattr(weight, "to_local")
        or weight.device_mesh.ndim != 1
        or len(weight.placements) != 1
        or not weight.placements[0].is_shard(0)
    ):
        return None
    out, width = quant_state.shape
    per_element = 2 * weight.element_size()  # 4-bit codes per storage element
    total = weight.shape[0]
    world = weight.device_mesh.size()
    size = len(columns)
    codes = -(-total // world) * per_element  # codes of a full shard
    if (
        total * per_element != out * width
        or codes % width
        or width % quant_state.blocksize
        or out * size * quant_state.dtype.itemsize > weight.numel() * weight.element_size()
    ):
        return None
    # lazy: only a 4-bit layer sharded by FSDP2 gets here
    from bitsandbytes.functional import QuantState, dequantize_4bit
    from torch.distributed.tensor import DTensor

    device = weight.device_mesh.device_type  # offloaded shards (fsdp_offload_params) are read there
    local = weight.to_local().detach().to(device)  # [rows * width / k, 1]
    rows = local.shape[0] * per_element // width
    first = weight.device_mesh.get_local_rank() * codes // quant_state.blocksize
    absmax = _absmax(quant_state)[first : first + -(-rows * width // quant_state.blocksize)].to(device)
    with torch.no_grad():
        values = torch.empty(rows, size, dtype=quant_state.dtype, device=device)
        if rows:
            mine = QuantState(
                absmax,
                shape=torch.Size((rows, width)),
                code=quant_state.code,
                blocksize=quant_state.blocksize,
                quant_type=quant_state.quant_type,
                dtype=quant_state.dtype,
            )  # [rows, width]: this shard's blocks, not nested
            values = dequantize_4bit(local, mine)[:, columns.to(device)]
        return DTensor.from_local(
            values, weight.device_mesh, weight.placements, run_check=False, shape=(out, size), stride=(size, 1)
        ).full_tensor()


def _absmax(quant_state: object) -> torch.Tensor:
    """``[blocks]`` float32 absmax of every block; a double-quantized (nested) one dequantized first, as
    bitsandbytes' ``dequantize_4bit`` does."""
    if not quant_state.nested:
        return quant_state.absmax
    from bitsandbytes.functional import dequantize_blockwise  # lazy: only a 4-bit layer gets here

    return (dequantize_blockwise(quant_state.absmax, quant_state.state2) + quant_state.offset).float()


def _quant_state(base: nn.Module) -> object | None:
    """The bitsandbytes 4-bit ``QuantState`` of ``base``'s weight, None for any other layer. It rides on the weight
    (``Params4bit``); under FSDP2 the weight is a DTensor of the packed storage that lost it, and bitsandbytes keeps it
    on the layer (``Linear4bit.quant_state``, which its own forward puts back on the weight)."""
    quant_state = getattr(base.weight, "quant_state", None)
    return quant_state if quant_state is not None else getattr(base, "quant_state", None)


def dora_row_norm(weight: torch.Tensor, lora_weight: torch.Tensor, scaling: float) -> torch.Tensor:
    """``[out]`` float32: DoRA's ``||W + s B A||_row``, detached, for ``[out, in]`` ``weight`` and ``lora_weight``
    (``B A``), through one float32 temporary of ``W``'s size."""
    with torch.no_grad():
        return torch.linalg.norm(weight.to(torch.float32, copy=True).add_(lora_weight.float(), alpha=scaling), dim=1)


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
        weight = DTensor.from_local(
            local,
            weight.device_mesh,
            weight.placements,
            run_check=False,
            shape=(weight.shape[0], len(columns)),
            stride=(len(columns), 1),
        )
    return weight.full_tensor(grad_placements=[Partial("avg")] * len(weight.placements))


def base_and_adapters(o_proj: nn.Module) -> tuple[nn.Linear, list[str]]:
    """(the Linear holding ``W_O``, plain or bitsandbytes-quantized, the names of the LoRA / DoRA adapters whose
    delta adds to it: none for a plain ``o_proj``, or when merged or disabled)."""
    base = getattr(o_proj, "base_layer", None)
    if base is None:
        if not isinstance(o_proj, nn.Linear):
            raise TypeError(
                f"o_proj is a {type(o_proj).__name__}; llamafactory-hera supports nn.Linear and LoRA-wrapped Linear."
            )
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


def project_heads(
    o_proj: nn.Module, x_heads: torch.Tensor, heads: list[int], head_dim: int, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """``[len(heads), ..., d]``: each head's contribution to the residual stream, its slice of ``x_heads``
    ``[..., len(heads) * head_dim]`` (the ``o_proj`` input's slices for ``heads``, in that order) through its ``W_O``
    columns, in float32 (inputs and weight cast). Over every head they sum to ``o_proj(x) - bias`` (LoRA dropout
    aside). ``weight``: the ``[d, len(heads) * head_dim]`` effective weight columns when already read (ZeRO-3: in the
    modules' calls, hera/capture.py), else read here (:func:`effective_weight_columns`)."""
    if weight is None:
        weight = effective_weight_columns(o_proj, head_columns(heads, head_dim, x_heads.device))
    w_sel = weight.unflatten(-1, (len(heads), head_dim))  # [d, n, dh] float32
    x_sel = x_heads.float().unflatten(-1, (len(heads), head_dim))  # [..., n, dh]
    return torch.einsum("...nk,dnk->n...d", x_sel, w_sel)


def gathered(module: nn.Module) -> contextlib.AbstractContextManager:
    """Context in which a ZeRO-3 partitioned module's parameters are whole (a collective: every rank enters it); a
    no-op for a module without any."""
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed  # lazy: an optional install, only under ZeRO-3

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
