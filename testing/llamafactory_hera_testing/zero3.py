"""DeepSpeed ZeRO-3's partitioning as HeRA meets it, without DeepSpeed: a parameter with a ``ds_id`` whose data is an
empty 1-D placeholder outside its own module's call, and HeRA's in-call projection run on one ``o_proj``."""

from __future__ import annotations

import torch

from llamafactory_hera.hera.capture import InCallColumns
from llamafactory_hera.hera.projection import head_columns
from llamafactory_hera_testing.projection import project_heads


def partition_like_zero3(module: torch.nn.Module) -> None:
    """Every parameter of ``module`` as DeepSpeed ZeRO-3 leaves it: a ``ds_id``, its shape in ``ds_shape``, the data an
    empty 1-D placeholder outside its own module's call (gathered by a pre-hook and again before the module's
    backward, released by a hook after the forward)."""
    for index, sub in enumerate(module.modules()):
        own = dict(sub.named_parameters(recurse=False))
        if not own:
            continue
        whole = {name: p.data for name, p in own.items()}
        for p in own.values():
            p.ds_id, p.ds_shape = index, p.shape
            p.data = torch.empty(0, dtype=p.dtype)

        def gather(mod, args, params=own, data=whole):
            for name, p in params.items():
                p.data = data[name]

        def release(mod, args, output, params=own):
            for p in params.values():
                p.data = torch.empty(0, dtype=p.dtype)

        sub.register_forward_pre_hook(gather)
        sub.register_forward_hook(release)
        sub.register_full_backward_pre_hook(lambda mod, grad_output, gather=gather: gather(mod, None))


def project_in_call(o_proj: torch.nn.Module, x_heads: torch.Tensor, heads: list[int], head_dim: int,
                    call_input: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(HeRA's ``[n, B, d]`` projection of ``x_heads`` read in one armed call of ``o_proj`` on ``call_input`` (zeros
    when None), that call's output). A base weight without a ``ds_id`` gets one for the call (nothing partitioned: the
    in-call path reads the same weights)."""
    reader = InCallColumns(o_proj, head_columns(heads, head_dim))
    marked = None if hasattr(reader.base.weight, "ds_id") else reader.base.weight
    if marked is not None:
        marked.ds_id = -1
    reader.armed = True
    try:
        output = o_proj(torch.zeros(1, reader.base.in_features, dtype=x_heads.dtype) if call_input is None
                        else call_input)
    finally:
        reader.armed = False
        if marked is not None:
            del marked.ds_id
    weight = reader.take()
    assert weight is not None, "the in-call path did not engage"
    return project_heads(o_proj, x_heads, heads, head_dim, weight), output
