"""Some input columns of a bitsandbytes 4-bit weight that FSDP2 shards, read without gathering its packed storage.

bitsandbytes packs a ``[out, in]`` weight row-major into ``[out * in / k, 1]`` elements of its storage dtype (``k``
4-bit codes each: 2 per byte; ``k = 4`` in bf16, the storage LLaMA-Factory sets under FSDP), quantized in blocks of
``blocksize`` consecutive codes, one absmax each (the ``QuantState``, whole on every rank: it stays on the layer).
FSDP2 shards the storage's dim 0 as ``torch.chunk`` does: ``chunk = ceil(M / world)`` elements, rank i holding
``[i * chunk, min((i + 1) * chunk, M))`` (the last ones short or empty). When ``chunk * k`` codes are whole rows and
whole blocks, each rank's shard is rows ``[i * chunk * k / in, ...)`` of the weight: it is dequantized there, its
``[rows, C]`` columns taken, and only those are all-gathered into ``[out, C]``.
"""

from __future__ import annotations

import torch


def sharded_columns(weight: torch.Tensor, quant_state: object, columns: torch.Tensor) -> torch.Tensor | None:
    """``[out, C]`` of the 4-bit weight at input ``columns`` ``[C]``, in the dequantized dtype (``quant_state.dtype``),
    bit for bit what ``dequantize_4bit`` of the whole packed weight gives there; no gradient (a frozen base). None
    when ``weight`` is not an FSDP2 shard (a DTensor ``Shard(0)`` on a 1-D mesh) of whole rows and whole blocks, or when
    the columns would move more bytes than the packed weight (many heads of a layer): the caller gathers it whole.
    Decided from global shapes only, so every rank takes the same path and issues the same collectives."""
    if not hasattr(weight, "to_local") or weight.device_mesh.ndim != 1 or len(weight.placements) != 1 \
            or not weight.placements[0].is_shard(0):
        return None
    out, width = quant_state.shape
    per_element = 2 * weight.element_size()  # 4-bit codes per storage element
    total, world, size = weight.shape[0], weight.device_mesh.size(), len(columns)
    codes = -(-total // world) * per_element  # codes of a full shard
    if total * per_element != out * width or codes % width or codes % quant_state.blocksize \
            or out * size * quant_state.dtype.itemsize > weight.numel() * weight.element_size():
        return None
    from bitsandbytes.functional import QuantState, dequantize_4bit  # lazy: only a 4-bit layer gets here
    from torch.distributed.tensor import DTensor

    device = weight.device_mesh.device_type  # offloaded shards (fsdp_offload_params) are read there
    local = weight.to_local().detach().to(device)  # [rows * width / k, 1]
    rows = local.shape[0] * per_element // width
    first = weight.device_mesh.get_local_rank() * codes // quant_state.blocksize
    absmax = _absmax(quant_state)[first:first + -(-rows * width // quant_state.blocksize)].to(device)
    with torch.no_grad():
        values = torch.empty(rows, size, dtype=quant_state.dtype, device=device)
        if rows:
            mine = QuantState(absmax, shape=torch.Size((rows, width)), code=quant_state.code,
                              blocksize=quant_state.blocksize, quant_type=quant_state.quant_type,
                              dtype=quant_state.dtype)  # [rows, width]: this shard's blocks, not nested
            values = dequantize_4bit(local, mine)[:, columns.to(device)]
        return DTensor.from_local(values, weight.device_mesh, weight.placements, run_check=False,
                                  shape=(out, size), stride=(size, 1)).full_tensor()


def _absmax(quant_state: object) -> torch.Tensor:
    """``[blocks]`` float32 absmax of every block; a double-quantized (nested) one dequantized first, as
    bitsandbytes' ``dequantize_4bit`` does."""
    if not quant_state.nested:
        return quant_state.absmax
    from bitsandbytes.functional import dequantize_blockwise

    return (dequantize_blockwise(quant_state.absmax, quant_state.state2) + quant_state.offset).float()
