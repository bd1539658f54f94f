"""The heads' representations: their ``o_proj`` inputs (hera/capture.py) projected per head through ``o_proj``
(paper Eq. 6–7, App. A).

``o_proj``'s weight is ``[d, H * d_head]`` and its input head-major, so head h owns input columns
``h*d_head:(h+1)*d_head`` and contributes ``x[.., h-slice] @ W[:, h-slice].T`` (bias excluded), ``W`` read as the
forward uses it (:func:`effective_weight_columns`).
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Partial


def effective_weight_columns(o_proj: nn.Module, columns: torch.Tensor) -> torch.Tensor:
    """``[d, C]`` float32 effective weight of ``o_proj`` at input ``columns`` ``[C]``, bias excluded, plus each active
    unmerged adapter's delta. Summed in float32: in bf16 a LoRA delta of a few 1e-5 of the weight is mostly rounded
    away."""
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
    """One adapter at the heads' columns: float32 ``lora_a`` ``[r, C]``, ``lora_b`` ``[d, r]``, ``scaling``, and
    ``dora`` ``(magnitude [d], row norm [d])`` or None."""

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scaling: float
    dora: tuple[torch.Tensor, torch.Tensor] | None


def combined(weight: torch.Tensor, adapters: list[AdapterColumns]) -> torch.Tensor:
    """``[d, C]`` float32: the base ``weight`` columns ``[d, C]`` plus each adapter's delta, ``s B A`` (LoRA) or
    ``(c - 1) W + c s B A`` with ``c = m / ||W + s B A||_row`` (DoRA)."""
    total = weight
    for adapter in adapters:
        if adapter.dora is None:  # W + s B A in one op
            total = torch.addmm(total, adapter.lora_b, adapter.lora_a, alpha=adapter.scaling)
            continue
        delta = adapter.scaling * (adapter.lora_b @ adapter.lora_a)
        magnitude, norm = adapter.dora
        row = (magnitude.float() / norm)[:, None]
        total = total + ((row - 1) * weight + row * delta)
    return total


def _dora_norm(base: nn.Module, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``[d]``: DoRA's ``||W + s B A||_row``, detached. Under FSDP2 (floating weight) each rank takes its own rows'
    norms (``W``, ``B`` sharded by rows; ``A`` whole) and the norms are gathered: no whole ``W`` moves."""
    weight = base.weight
    with torch.no_grad():
        if _quant_state(base) is None and hasattr(weight, "full_tensor") and hasattr(lora_b, "to_local"):
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
    """``[out, C]`` float32 weight of a base ``Linear`` at input ``columns`` (None: all), as its forward uses it.

    bitsandbytes 8-bit: ``codes * SCB / 127`` (per-row absmax). 4-bit: dequantized whole, then indexed; under FSDP2 by
    shard where possible (:func:`sharded_columns`). Other integer storage is refused."""
    weight = base.weight
    quant_state = _quant_state(base)
    if quant_state is not None:
        if getattr(quant_state, "packing_format_for_cpu", False):  # a layout dequantize_4bit does not read
            raise RuntimeError(
                "o_proj's 4-bit weight is in bitsandbytes' CPU inference layout (repacked by an eval-mode forward "
                "without gradient on a CPU with AVX512-BF16), which dequantize_4bit does not read; run the model's "
                "eval forwards under llamafactory_hera.training.eval_forward.keep_4bit_layout."
            )
        # lazy: bitsandbytes is installed only where a model is loaded 4-bit
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
            return sharded.float()
        full = dequantize_4bit(whole(weight).detach(), quant_state)  # [out, in]; another shard gathered whole
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
    """``[out, C]`` of the 4-bit weight at ``columns`` in ``quant_state.dtype``, bit for bit what ``dequantize_4bit``
    of the whole weight gives; no gradient (frozen base). None when ``weight`` is not an FSDP2 shard of whole rows of
    whole blocks, or the columns would move more bytes than the packed weight. Decided from global shapes, so all
    ranks issue the same collectives.

    bitsandbytes packs ``[out, in]`` row-major into ``[out * in / k, 1]`` storage elements (``k`` codes each),
    ``blocksize`` codes per absmax. When a shard's ``chunk * k`` codes are whole rows and ``in`` whole blocks, rank i
    holds rows ``[i * chunk * k / in, ...)``: dequantized there, its ``[rows, C]`` gathered."""
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
    """``[blocks]`` float32 absmax; a nested one dequantized first, as ``dequantize_4bit`` does."""
    if not quant_state.nested:
        return quant_state.absmax
    from bitsandbytes.functional import dequantize_blockwise  # lazy: only a 4-bit layer gets here

    return (dequantize_blockwise(quant_state.absmax, quant_state.state2) + quant_state.offset).float()


def _quant_state(base: nn.Module) -> object | None:
    """The 4-bit ``QuantState`` of ``base``'s weight (under FSDP2, of ``Linear4bit``), else None."""
    quant_state = getattr(base.weight, "quant_state", None)
    return quant_state if quant_state is not None else getattr(base, "quant_state", None)


def dora_row_norm(weight: torch.Tensor, lora_weight: torch.Tensor, scaling: float) -> torch.Tensor:
    """``[out]`` float32 DoRA ``||W + s B A||_row``, detached (``lora_weight``: ``B A``); one float32 temporary."""
    with torch.no_grad():
        return torch.linalg.norm(weight.to(torch.float32, copy=True).add_(lora_weight.float(), alpha=scaling), dim=1)


def whole(weight: torch.Tensor, columns: torch.Tensor | None = None) -> torch.Tensor:
    """``weight`` whole, or its ``[:, columns]``. An FSDP2 DTensor gathers only ``columns`` (a collective), its
    gradient averaged as FSDP2's own (a sum would scale by the rank count)."""
    if not hasattr(weight, "full_tensor"):
        return weight if columns is None else weight[:, columns]
    if weight.device.type != weight.device_mesh.device_type:
        weight = weight.to(weight.device_mesh.device_type)
    if columns is not None and any(p.is_shard() and p.dim != 0 for p in weight.placements):
        return whole(weight)[:, columns]  # not sharded by rows (never by FSDP2)
    if columns is not None:  # a DTensor sharded as the weight is (to_local, from_local keep autograd)
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
    """(the Linear holding ``W_O``, the LoRA / DoRA adapters adding to it: none when plain, merged or disabled)."""
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
    """``weight``'s model shape (a ZeRO-3 partition's ``ds_shape``: its data is an empty placeholder); () for None."""
    if weight is None:
        return ()
    return tuple(weight.ds_shape) if hasattr(weight, "ds_id") else tuple(weight.shape)


def head_columns(heads: list[int], head_dim: int, device: torch.device | None = None) -> torch.Tensor:
    """``[len(heads) * head_dim]`` input-column indices of ``heads`` (head-major)."""
    offsets = torch.arange(head_dim, device=device)
    return torch.cat([h * head_dim + offsets for h in heads])


def gathered(module: nn.Module) -> contextlib.AbstractContextManager:
    """Context where a ZeRO-3 module's parameters are whole (a collective: every rank enters); else a no-op."""
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed  # lazy: an optional install, only under ZeRO-3

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
