"""bitsandbytes' 4-bit layers kept in their training layout through every eval-mode forward: the trained model's (HeRA's
alignment monitor, evaluation steps, HARC's directions and generation), ``select``'s, the eval engine's (GCG
backpropagates through it).

bitsandbytes >= 0.50 (``Linear4bit.forward``) repacks a 4-bit weight in place for its CPU kernel the first time the
layer runs in eval mode without grad on a CPU with AVX512-BF16, and packs it back only on a state-dict save or a move to
GPU. Then a backward through the layer fails or silently passes no gradient, and the weight is not what
``dequantize_4bit`` reads. Keeping the layout costs the eval forward that kernel only; the product is the same.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

REPACK_FLAG = "support_avx512bf16_for_cpu"  # Linear4bit: repack for the CPU kernel in eval


def keep_4bit_layout(model: nn.Module) -> int:
    """Switch eval-mode CPU repacking off in every 4-bit layer; returns how many had it on (0 where none would repack:
    no 4-bit layer, a GPU, no AVX512-BF16, an older bitsandbytes)."""
    switched = 0
    for module in model.modules():
        if getattr(module, REPACK_FLAG, False):
            setattr(module, REPACK_FLAG, False)
            switched += 1
    return switched


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the block (its mode restored after), 4-bit layout kept. Autograd is the caller's to
    switch off."""
    keep_4bit_layout(model)
    training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(training)
