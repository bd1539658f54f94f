"""bitsandbytes' 4-bit layers kept in the layout they train and are read in, through every eval-mode forward: of the
model a method trains (HeRA's alignment monitor, the Trainer's evaluation steps, HARC's directions and end-of-run
generation), of the model ``select`` scores, and of the eval engine's (GCG backpropagates through it).

bitsandbytes >= 0.50 (``Linear4bit.forward``) repacks a 4-bit weight in place for its CPU inference kernel the first
time the layer runs in eval mode on an input without grad, on a CPU with AVX512-BF16, and packs it back only when the
state dict is saved or the layer moves to a GPU. After that, a backward through the layer fails or silently passes no
gradient to its input, and the weight is no longer what ``dequantize_4bit`` reads. Keeping the layout costs the eval
forward that kernel only; it computes the same product as training does.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

REPACK_FLAG = "support_avx512bf16_for_cpu"  # bitsandbytes' Linear4bit: repack for the CPU kernel in eval mode


def keep_4bit_layout(model: nn.Module) -> int:
    """Switch bitsandbytes' eval-mode CPU repacking off in every 4-bit layer of ``model``; returns how many layers
    had it on (0 where none would repack: no 4-bit layer, a GPU, a CPU without AVX512-BF16, or a bitsandbytes
    without the repack)."""
    switched = 0
    for module in model.modules():
        if getattr(module, REPACK_FLAG, False):
            setattr(module, REPACK_FLAG, False)
            switched += 1
    return switched


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the duration (its mode restored after), its 4-bit layers' layout kept
    (:func:`keep_4bit_layout`). Autograd is the caller's to switch off."""
    keep_4bit_layout(model)
    training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(training)
