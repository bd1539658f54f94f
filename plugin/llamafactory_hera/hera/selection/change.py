"""What ``select --report`` says about each head's MKNN change: the delta, its resolution, a paired bootstrap interval
over the pairs (:mod:`llamafactory_hera.hera.selection.bootstrap`), and whether the change is within noise.

A delta is *within noise* when its interval contains 0 or it is smaller than the resolution (one step of the score).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from llamafactory_hera.hera.selection.bootstrap import paired_bootstrap, resolution, within_noise
from llamafactory_hera.hera.selection.scores import HeadNeighbours

RESAMPLES = 1000
MIN_RESAMPLES = 100  # select --report --bootstrap N: the fewest it takes
CONFIDENCE = 0.95


@dataclass
class HeadChange:
    """Before/after MKNN of every head (``[L, H]`` arrays) with the bootstrap's interval of the difference."""

    before: np.ndarray
    after: np.ndarray
    low: np.ndarray  # [L, H] interval of after - before
    high: np.ndarray
    noise: np.ndarray  # [L, H] bool: within noise
    deltas: np.ndarray  # [resamples, L, H] the bootstrap's differences
    resolution: float
    settings: dict[str, Any]  # resamples, redrawn, confidence, seed, method

    @property
    def delta(self) -> np.ndarray:
        """``[L, H]`` after - before."""
        return self.after - self.before


def measure_change(before: HeadNeighbours, after: HeadNeighbours, k: int, seed: int, resamples: int = RESAMPLES,
                   confidence: float = CONFIDENCE, device: torch.device | str = "cpu") -> HeadChange:
    """The paired bootstrap of every head's difference (both scored with ``prefix`` > 0 on the same pairs)."""
    if before.heads is None or after.heads is None or before.teacher is None:
        raise ValueError("measure_change needs the ranked neighbours (score with prefix > 0)")
    layers, heads, num = before.heads.shape[:3]
    boot = paired_bootstrap(before.heads.flatten(0, 1), after.heads.flatten(0, 1), before.teacher, k,
                            resamples=resamples, seed=seed, confidence=confidence, device=device)
    step = resolution(num, k)
    first, second = before.scores.numpy(), after.scores.numpy()
    low, high = boot.low.reshape(layers, heads), boot.high.reshape(layers, heads)
    noise = within_noise(after.scores - before.scores, low, high, step)
    settings = {"resamples": boot.resamples, "redrawn": boot.redrawn, "confidence": confidence, "seed": seed,
                "method": "paired percentile bootstrap: pairs resampled with replacement, MKNN recomputed on the "
                          "resampled set before and after with the same resample (copies of a pair are not each "
                          "other's neighbours)"}
    return HeadChange(first, second, low.numpy(), high.numpy(), noise.numpy(),
                      boot.deltas.reshape(-1, layers, heads).numpy(), step, settings)


def _interval(low: float, high: float) -> str:
    from llamafactory_hera.anatomy.plot_text import signed_number

    return f"[{signed_number(low, 4)}, {signed_number(high, 4)}]"


def _row(head: str, before: Any, after: Any, delta: float, low: float, high: float, noise: bool) -> dict[str, Any]:
    return {"head": head, "before": before, "after": after, "delta": delta, "ci_low": low, "ci_high": high,
            "ci": _interval(low, high), "within_noise": noise, "change": "within noise" if noise else "beyond noise"}


def summary_rows(change: HeadChange, selected: list[tuple[int, int]]) -> list[dict[str, Any]]:
    """Per aligned head: before, after, delta, its interval and whether it is within noise; then the mean of all
    other heads (interval of the mean difference over the same resamples) and the other head that dropped most."""
    delta = change.delta
    rows = [_row(f"L{layer}H{head}", float(change.before[layer, head]), float(change.after[layer, head]),
                 float(delta[layer, head]), float(change.low[layer, head]), float(change.high[layer, head]),
                 bool(change.noise[layer, head])) for layer, head in selected]
    others = np.ones_like(delta, dtype=bool)
    for layer, head in selected:
        others[layer, head] = False
    if others.any():
        mean = float(delta[others].mean())
        tail = (1.0 - change.settings["confidence"]) / 2
        low, high = np.quantile(change.deltas[:, others].mean(-1), [tail, 1.0 - tail]) if len(change.deltas) else (
            np.nan, np.nan)
        noise = bool(low <= 0 <= high or abs(mean) < change.resolution * (1 - 1e-6))
        rows.append(_row(f"others ({int(others.sum())}) mean", float(change.before[others].mean()),
                         float(change.after[others].mean()), mean, float(low), float(high), noise))
        masked = np.where(others, delta, np.inf)
        layer, head = np.unravel_index(int(np.argmin(masked)), masked.shape)
        rows.append(_row(f"others: largest drop L{layer}H{head}", float(change.before[layer, head]),
                         float(change.after[layer, head]), float(delta[layer, head]), float(change.low[layer, head]),
                         float(change.high[layer, head]), bool(change.noise[layer, head])))
    return rows


TABLE_COLUMNS = ["head", "before", "after", "delta", "ci", "change"]


def change_note(change: HeadChange, num_pairs: int, k: int) -> str:
    """The lines printed under the table: what the resolution and the interval are."""
    settings = change.settings
    percent = f"{100 * settings['confidence']:g}%"
    redrawn = f"; {settings['redrawn']} resamples redrawn" if settings["redrawn"] else ""
    return (f"resolution: 1/({num_pairs} pairs x k={k}) = {change.resolution:.4f} (the smallest step a score moves)\n"
            f"ci: {percent} paired bootstrap interval of delta, {settings['resamples']} resamples of the {num_pairs} "
            f"pairs (seed {settings['seed']}{redrawn}); within noise: the interval contains 0 or |delta| < resolution\n"
            f"{int(change.noise.sum())} of {change.noise.size} heads changed within noise")


def report_fields(change: HeadChange) -> dict[str, Any]:
    """The report JSON's fields for the change (``[L][H]`` lists)."""
    return {"delta": change.delta.tolist(), "delta_ci_low": change.low.tolist(), "delta_ci_high": change.high.tolist(),
            "within_noise": change.noise.tolist(), "resolution": change.resolution, "bootstrap": change.settings}
