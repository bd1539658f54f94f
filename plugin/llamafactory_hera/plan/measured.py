"""The GPU leases' measurements plan times a run from (docs/cost.md, "Time: what the GPU leases measured").

Every step row is bench/overhead.py's recipe on Qwen3-VL-8B (bf16, LoRA r 8, QLoRA in 4 bits, micro-batch 8 of
230-token rows with one 448 px image each).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from llamafactory_hera.plan.cards import CARDS

ROWS = 8  # the measured recipe's micro-batch: 8 rows of 230 tokens
ROW_TOKENS = 230


@dataclass(frozen=True)
class Lease:
    card: str  # as recorded ("H100 80 GB": SXM or PCIe not recorded)
    date: str


H100_FIRST = Lease("H100 80 GB", "2026-11-24")
H100_SECOND = Lease("H100 80 GB", "2026-11-24, another machine")
H200_QLORA = Lease("H200", "2026-11-26")
H200 = Lease("H200", "2026-11-28")


@dataclass(frozen=True)
class Step:
    """One run's median step on a lease (ms), of ``kind`` (``lora``, ``qlora``) and ``arm`` (``sft``, ``hera``)."""

    lease: Lease
    commit: str
    kind: str
    arm: str
    median_ms: float

    @property
    def seconds_per_op(self) -> float:
        return self.median_ms / 1e3 / COUNTED[self.kind, self.arm][1]


# (kind, arm) -> (FLOPs, aten ops) of a micro-step as plan counts it (bench/cost_measured.py recounts)
COUNTED = {
    ("lora", "sft"): (89.00e12, 27_607),
    ("lora", "hera"): (89.00e12, 28_456),
    ("qlora", "sft"): (89.00e12, 28_227),
    ("qlora", "hera"): (89.00e12, 29_084),
}
# H100 leases: SFT only (their HeRA runs checkpointed every layer non-reentrant, which plan does not count)
STEPS = (
    Step(H100_FIRST, "2b8278c", "lora", "sft", 660.6),
    Step(H100_SECOND, "a532ffc", "lora", "sft", 725.8),
    Step(H200_QLORA, "0db5f87", "qlora", "sft", 675.7),
    Step(H200_QLORA, "0db5f87", "qlora", "hera", 611.9),
    Step(H200_QLORA, "148dd52", "qlora", "sft", 656.1),
    Step(H200_QLORA, "148dd52", "qlora", "hera", 744.8),
    *(Step(H200, "f4a1da3", "lora", "sft", ms) for ms in (511.1, 481.8, 483.3, 425.7)),
    *(Step(H200, "f4a1da3", "lora", "hera", ms) for ms in (427.7, 567.8, 548.9, 571.0)),
)
# each kind's fastest step, ms (either arm: equal FLOPs): a step's GPU busy time is at most this
FASTEST = {
    "lora": (H200, "f4a1da3", 380.0, "the fastest step of its runs"),
    "qlora": (H200_QLORA, "0db5f87", 611.9, "the fastest run's median step"),
}


@dataclass(frozen=True)
class Spread:
    low: float
    median: float
    high: float
    source: str


def measured_kind(lora: bool, bits: int | None) -> str:
    """``qlora`` (LoRA in 4 or 8 bits), else ``lora``; a full fine-tune is timed as LoRA (none measured)."""
    return "qlora" if lora and bits else "lora"


def per_op(kind: str) -> Spread:
    """The host's seconds per aten op over the runs of ``kind`` (their FLOPs are under a quarter of the peak)."""
    rows = [step for step in STEPS if step.kind == kind]
    values = sorted(step.seconds_per_op for step in rows)
    leases = sorted({f"{step.lease.card} {step.lease.date}" for step in rows})
    return Spread(
        values[0],
        statistics.median(values),
        values[-1],
        f"{len(rows)} {'QLoRA' if kind == 'qlora' else 'LoRA'} runs on {len(leases)} "
        f"lease{'s' if len(leases) > 1 else ''}: {'; '.join(leases)}",
    )


def efficiency(kind: str) -> tuple[float, str]:
    """The floor of ``kind``'s share of the card's peak (the FLOPs over the fastest step), and its source."""
    lease = FASTEST[kind][0]
    ms = FASTEST[kind][2]
    flops = COUNTED[kind, "sft"][0]
    share = flops / (CARDS[lease.card].bf16_tflops * 1e12 * ms / 1e3)
    return share, (
        f"{'QLoRA' if kind == 'qlora' else 'LoRA'} on the {lease.card} lease of {lease.date}: "
        f"{flops / 1e12:.1f} TFLOPs in {ms:.0f} ms, {FASTEST[kind][3]}"
    )


@dataclass(frozen=True)
class TeacherPass:
    lease: Lease
    commit: str
    images: int
    seconds: float
    warm: bool = False  # after a pass of the same images (bench/selection.py): no start, the rate


# DINOv2-L (304 M parameters, 224 px crops of 448 px images), bf16: the pass before step 1 (128 images, batches
# of 32) and bench/selection.py's (1,000 images, batches of 128, warm)
TEACHER = (
    TeacherPass(H100_FIRST, "2b8278c", 1000, 4.237, warm=True),
    TeacherPass(H100_FIRST, "2b8278c", 128, 1.53),
    TeacherPass(H200_QLORA, "0db5f87", 128, 1.39),
    TeacherPass(H200_QLORA, "148dd52", 128, 1.38),
    TeacherPass(H200, "f4a1da3", 128, 1.35),
)


def teacher_rate() -> float:
    """The teacher's images per second once started (the warm row's)."""
    warm = [row for row in TEACHER if row.warm]
    return sum(row.images for row in warm) / sum(row.seconds for row in warm)


def teacher_start() -> Spread:
    """The pass's start (seconds): each cold pass less its images at :func:`teacher_rate`."""
    starts = sorted(row.seconds - row.images / teacher_rate() for row in TEACHER if not row.warm)
    return Spread(
        starts[0],
        statistics.median(starts),
        starts[-1],
        f"{len(starts)} passes of 128 images on 3 leases (H100 2026-11-24, H200 2026-11-26 and 2026-11-28) less "
        f"those images at {teacher_rate():.0f} images/s (H100 2026-11-24: 1,000 images after a warm-up pass)",
    )
