"""Whether a head's MKNN change is real (``select --report``; docs/hera.md, "Choosing the heads").

A difference is *within noise* when its paired bootstrap interval contains 0 or it is under ``1 / (N k)``, the
smallest step MKNN on N pairs with k neighbours moves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from llamafactory_hera.hera.selection.scores import HeadNeighbours

RESAMPLES = 1000
MIN_RESAMPLES = 100  # the fewest --bootstrap takes
CONFIDENCE = 0.95
METHOD = (
    "paired percentile bootstrap: pairs resampled with replacement with their agreement as scored on the full "
    "set (neighbourhoods are not recomputed), after - before with the same resample"
)
_CHUNK_ELEMENTS = 2**22  # elements of one [resamples, N] block of draws


def resolution(num_pairs: int, k: int) -> float:
    return 1.0 / (num_pairs * k)


def within_noise(delta: Any, low: Any, high: Any, step: float) -> Any:
    """Elementwise: ``[low, high]`` contains 0 or ``|delta|`` is under one ``step``."""
    return ((low <= 0) & (high >= 0)) | (abs(delta) < step * (1 - 1e-6))


@dataclass
class HeadChange:
    """Every head's ``[L, H]`` before/after MKNN, interval of the difference, mark."""

    before: np.ndarray
    after: np.ndarray
    low: np.ndarray  # [L, H] interval of after - before
    high: np.ndarray
    noise: np.ndarray  # [L, H] bool: within noise
    deltas: np.ndarray  # [resamples, L, H] the bootstrap's differences
    resolution: float
    settings: dict[str, Any]  # resamples, confidence, seed, method

    @property
    def delta(self) -> np.ndarray:
        return self.after - self.before


def paired_bootstrap(
    before: HeadNeighbours,
    after: HeadNeighbours,
    k: int,
    seed: int,
    resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE,
) -> HeadChange:
    """Each head's percentile interval of ``after - before`` over resampled pairs, and the within-noise mark
    (float64 sums of whole counts make every difference exact)."""
    layers, heads, num = before.overlaps.shape
    # [L*H, N] shared neighbours after - before: whole
    gained = ((after.overlaps - before.overlaps) * k).round().double().reshape(layers * heads, num)
    generator = torch.Generator().manual_seed(seed)
    chunk = max(1, _CHUNK_ELEMENTS // num)
    blocks = []
    for start in range(0, resamples, chunk):
        picks = torch.randint(num, (min(chunk, resamples - start), num), generator=generator)
        copies = torch.zeros(picks.shape, dtype=torch.float64).scatter_add_(1, picks, torch.ones(picks.shape).double())
        blocks.append(copies @ gained.T / (num * k))  # [r, L*H]: resample's mean / k
    deltas = torch.cat(blocks).numpy().reshape(resamples, layers, heads)
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(deltas, [tail, 1.0 - tail], axis=0)
    step = resolution(num, k)
    first = before.scores.numpy()
    second = after.scores.numpy()
    noise = within_noise(second - first, low, high, step)
    settings = {"resamples": resamples, "confidence": confidence, "seed": seed, "method": METHOD}
    return HeadChange(first, second, low, high, noise, deltas, step, settings)
