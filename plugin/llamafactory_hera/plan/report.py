"""plan's text: memory per GPU by category and the time of a step, a run and HeRA's passes before step 1."""

from __future__ import annotations

from typing import Any

from llamafactory_hera.plan import estimate, timing
from llamafactory_hera.plan.cards import Card
from llamafactory_hera.plan.measured import (
    ROW_TOKENS,
    ROWS,
    efficiency,
    measured_kind,
    per_op,
    teacher_rate,
    teacher_start,
)
from llamafactory_hera.plan.timing import Network

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
    """``low-high unit`` of ``values / per``: whole above 100, two decimals above 0.1, else three."""
    low, high = sorted(v / per for v in values)
    form = ",.0f" if high >= 100 else ".2f" if high >= 0.1 else ".3f"
    return f"{low:{form}}-{high:{form}}" + (f" {unit}" if unit else "")


def duration(seconds: tuple) -> str:
    """A band of ``seconds`` in s, min or h, whichever its longer end reads best in."""
    high = max(seconds)
    return span(seconds, *(("s", 1) if high < 120 else ("min", 60) if high < 7200 else ("h", 3600)))


def fit_line(needed: float, card: Card) -> str:
    verdict = "fits" if card.holds(needed) else "does NOT fit"
    return f"  {verdict}: {needed / GiB:.2f} GiB needed of {card.memory_gib:g} GiB"


def time_lines(
    counts: dict[str, dict[str, float]],
    setup: estimate.Setup,
    card: Card,
    rows: int | None,
    keys: dict,
    sizes: Any,
    network: Network,
) -> list[str]:
    """Each arm's step and run time; HeRA's teacher pass and selection."""
    hera = "hera" in counts
    known = rows is not None
    rows = rows or 1000
    kind = measured_kind(setup.lora, setup.bits)
    share, source = efficiency(kind)
    cost = per_op(kind)
    lines = []
    for name in ("sft", "hera") if hera else ("sft",):
        ratio = sizes.padded / sizes.peak  # counted at the peak; at the mean, attention is quadratic in length
        attention = counts[name]["attention"] * ratio**2
        flops = (counts[name]["flops"] - counts[name]["attention"]) * ratio + attention
        comm = estimate.communicated(counts[name], setup)
        t = timing.times(flops, counts[name]["ops"], setup, card, rows, sizes.mean, comm, network)
        job = span(t["tokens/s"], "")
        per_node = f" ({span(t['tokens/s'], '', t['nodes'])} per node)" if t["nodes"] > 1 else ""
        lines += [
            f"  {name.upper()}: {flops * setup.accumulation / 1e12:.1f} TFLOPs and "
            f"{counts[name]['ops'] * setup.accumulation:,.0f} aten ops per GPU per optimizer step (attention "
            f"{attention / flops:.1%} of the FLOPs): step {span(t['step'], 's')}, the longest of compute, host and "
            f"communication; {job} tokens/s for the job{per_node}",
            f"    compute {span(t['compute'], 's')}: the FLOPs at the card's {card.bf16_tflops:g} TFLOP/s bf16 peak, "
            f"and at {share:.1%} of it, the floor the measured steps give (an upper bound; the GPU's busy time was not "
            f"measured): {source}{_unlike(setup, sizes)}",
            f"    host {span(t['host'][::2], 's')} (median {t['host'][1]:.2f} s): {counts[name]['ops']:,.0f} aten "
            f"ops a micro-step x {cost.low * 1e6:.1f}-{cost.high * 1e6:.1f} us an op (median {cost.median * 1e6:.1f}; "
            f"{cost.source}; collator and a log in every step)",
        ]
        if any(comm):
            received = (setup.accumulation * comm[0] + comm[1]) / 1e9
            lines.append(
                f"    communication: {received:,.1f} GB received per GPU per step under "
                f"{estimate.ENGINES[setup.engine]} (docs/cost.md), {t['communication']:.2f} s on {t['link']}, "
                "overlapped with the compute as the engine prefetches: "
                f"{span(tuple(t['communication'] / s * 100 for s in t['step']), '%')} of the step"
            )
        lines.append(
            f"    epoch of {rows} rows{'' if known else ' (the dataset is not at hand: per 1000 rows)'}, "
            f"{t['steps'][0]} steps: {duration(t['epoch'])}; run of {t['steps'][1]} steps: "
            f"{duration(t['run'])}, {span(t['gpu-hours'], '')} GPU-hours"
        )
    if hera:
        lines.append(_teacher_line(counts["hera"], setup, card, rows, keys, network))
    return lines


def _unlike(setup: estimate.Setup, sizes: Any) -> str:
    """How the run differs from the measured steps it is timed by."""
    tokens = setup.batch * sizes.padded
    said = [] if setup.lora else ["a full fine-tune, timed as LoRA (none measured)"]
    if round(tokens) != ROWS * ROW_TOKENS:
        said.append(f"{tokens:,.0f} tokens a micro-step against the measured {ROWS * ROW_TOKENS:,}")
    if not setup.checkpointing:
        said.append("without gradient checkpointing, measured with it")
    return f"; {', '.join(said)}" if said else ""


def _teacher_line(
    counts: dict[str, float], setup: estimate.Setup, card: Card, rows: int, keys: dict, network: Network
) -> str:
    start = teacher_start()
    rate = f"a start of {start.low:.2f}-{start.high:.2f} s and {teacher_rate():.0f} images/s per node: {start.source}"
    if str(keys.get("hera_teacher_precompute", "auto")).lower() == "false":
        line = "  teacher: its features computed in the steps (hera_teacher_precompute: false), not timed"
    else:
        nodes = network.nodes(setup.gpus)
        line = (
            f"  teacher pass before step 1 ({rows} images, the processor and the forward, over {nodes} node(s)): "
            f"{duration(timing.teacher_pass(rows, nodes))} ({rate})"
        )
    if keys.get("hera_heads", "auto") == "auto":
        select = int(keys.get("hera_select_samples") or 1000)
        captions = timing.seconds(estimate.selection_flops(counts, select), 0, measured_kind(True, setup.bits), card)
        images = timing.teacher_pass(select)
        line += (
            f"; head selection ({select} captions and their images, one GPU): "
            f"{duration(tuple(c + i for c, i in zip(captions, images, strict=True)))} (the captions' forward at the "
            "step's compute band, the images as the teacher's pass)"
        )
        if not card.holds(2 * counts["params"]):
            line += (
                "; the bf16 model exceeds one GPU, whose CPU-offloaded layers are copied in every batch: select "
                "first over the node's GPUs (llamafactory-hera select)"
            )
    return line
