"""The tables ``llamafactory-hera plan`` prints: memory per GPU by category, and a band of two figures."""

from __future__ import annotations

from llamafactory_hera.plan import estimate
from llamafactory_hera.plan.cards import Card

GiB = estimate.GIB


def memory_table(parts: dict[str, dict[str, float]], arm: str) -> list[str]:
    names = list(parts)
    lines = ["  memory per GPU (GiB)   " + "".join(f"{name.upper():>9}" for name in names)]
    for key in (
        "parameters",
        "gradients",
        "optimizer",
        "gathered",
        "activations",
        "temporaries",
        "step peak",
        "load peak",
    ):
        lines.append(f"    {key:20}" + "".join(f"{parts[name][key] / GiB:9.2f}" for name in names))
    if arm == "hera":
        extra = (parts["hera"]["step peak"] - parts["sft"]["step peak"]) / 2**20
        lines.append(f"    HeRA's extra over SFT: {extra:.1f} MiB (its captured heads, projection and loss)")
    lines.append(
        f"    + reserve {estimate.RESERVE / GiB:.0f} GiB (CUDA context, cuBLAS / NCCL workspaces, allocator) "
        "on the larger of step and load peak"
    )
    return lines


def span(values: tuple, unit: str, per: float = 1) -> str:
    """``low-high unit`` of ``values`` / ``per``: whole above 100, two decimals above 0.1, else three."""
    low, high = sorted(v / per for v in values)
    form = ",.0f" if high >= 100 else ".2f" if high >= 0.1 else ".3f"
    return f"{low:{form}}-{high:{form}}" + (f" {unit}" if unit else "")


def duration(seconds: tuple) -> str:
    """A band of ``seconds`` in seconds, minutes or hours, whichever its longer end reads best in."""
    high = max(seconds)
    return span(seconds, *(("s", 1) if high < 120 else ("min", 60) if high < 7200 else ("h", 3600)))


def fit_line(needed: float, card: Card) -> str:
    """The report's verdict on ``needed`` bytes per GPU."""
    verdict = "fits" if card.holds(needed) else "does NOT fit"
    return f"  {verdict}: {needed / GiB:.2f} GiB needed of {card.memory_gib:g} GiB"
