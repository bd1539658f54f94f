"""bitsandbytes' 4-bit layers kept in their training layout through every eval-mode forward (HeRA's monitor, evaluation
steps, HARC, ``select``, the eval engine, through which GCG backpropagates).

bitsandbytes >= 0.50 repacks a 4-bit weight in place for its CPU kernel the first time the layer runs in eval mode
without grad on an AVX512-BF16 CPU, and packs it back only on a state-dict save or a move to GPU. A backward through it
then fails or silently passes no gradient, and ``dequantize_4bit`` misreads the weight. The kept layout costs eval only
that kernel; the product is the same.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

REPACK_FLAG = "support_avx512bf16_for_cpu"  # Linear4bit: repack for the CPU kernel in eval


def keep_4bit_layout(model: nn.Module) -> int:
    """Switch eval-mode CPU repacking off in every 4-bit layer; how many had it on (0: no 4-bit layer, a GPU, no
    AVX512-BF16, an older bitsandbytes)."""
    switched = 0
    for module in model.modules():
        if getattr(module, REPACK_FLAG, False):
            setattr(module, REPACK_FLAG, False)
            switched += 1
    return switched


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the block (mode restored after), 4-bit layout kept. Autograd is the caller's."""
    keep_4bit_layout(model)
    training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(training)
