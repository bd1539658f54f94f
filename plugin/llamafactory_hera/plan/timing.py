"""A run's time from :mod:`.measured` and its links (docs/cost.md, "Time: what the GPU leases measured")."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from llamafactory_hera.plan.cards import Card
from llamafactory_hera.plan.measured import efficiency, measured_kind, per_op, teacher_rate, teacher_start


@dataclass(frozen=True)
class Network:
    """GPUs per node and ``cards`` network cards per node of ``gbits`` Gb/s each way (a ring uses them all at
    once, one NCCL channel a card)."""

    gpus_per_node: int = 8
    cards: int = 1
    gbits: float = 400.0

    def nodes(self, gpus: int) -> int:
        return math.ceil(gpus / self.gpus_per_node)

    def said(self) -> str:
        return f"{self.cards} x {self.gbits:g} Gb/s per node"


def link(card: Card, gpus: int, network: Network) -> tuple[str, float]:
    """The slowest link a ring over ``gpus`` crosses, described, and its bytes/s each way."""
    within = card.link_gbs / 2 * 1e9
    said = f"{card.link} ({card.link_gbs:g} GB/s datasheet, half each way)"
    nodes = network.nodes(gpus)
    between = network.cards * network.gbits / 8 * 1e9
    if nodes > 1 and between < within:
        return f"the network between {nodes} nodes ({network.said()}, {between / 1e9:g} GB/s each way)", between
    if nodes > 1:
        return f"{said}, slower than the network between {nodes} nodes ({network.said()})", within
    return said, within


def seconds(flops: float, ops: float, kind: str, card: Card) -> tuple[float, float]:
    """(fast, slow) seconds of ``flops`` and ``ops``: the longer of compute and host at each band end."""
    peak = card.bf16_tflops * 1e12
    cost = per_op(kind)
    return max(flops / peak, ops * cost.low), max(flops / (peak * efficiency(kind)[0]), ops * cost.high)


def times(
    flops_micro: float,
    ops_micro: float,
    setup: Any,
    card: Card,
    rows: int,
    tokens_per_row: float,
    comm: tuple[float, float] = (0.0, 0.0),
    network: Network | None = None,
) -> dict[str, Any]:
    """A run's figures, each (fast, slow): the step (``accumulation`` micro-steps, each at least ``comm[0]`` bytes'
    time, then ``comm[1]`` bytes'), an epoch of ``rows``, the run and more."""
    kind = measured_kind(setup.lora, setup.bits)
    peak = card.bf16_tflops * 1e12
    cost = per_op(kind)
    compute = (flops_micro / peak, flops_micro / (peak * efficiency(kind)[0]))
    host = tuple(ops_micro * s for s in (cost.low, cost.median, cost.high))
    network = network or Network()
    said, rate = link(card, setup.gpus, network)
    step = tuple(
        setup.accumulation * max(c, h, comm[0] / rate) + comm[1] / rate
        for c, h in zip(compute, (host[0], host[2]), strict=True)
    )
    steps_per_epoch = math.ceil(rows / (setup.batch * setup.gpus * setup.accumulation))
    run_steps = setup.max_steps if setup.max_steps > 0 else math.ceil(steps_per_epoch * setup.epochs)
    tokens = setup.batch * setup.gpus * setup.accumulation * tokens_per_row
    return {
        "step": step,
        "compute": tuple(setup.accumulation * c for c in compute),
        "host": tuple(setup.accumulation * h for h in host),
        "epoch": tuple(s * steps_per_epoch for s in step),
        "run": tuple(s * run_steps for s in step),
        "gpu-hours": tuple(s * run_steps * setup.gpus / 3600 for s in step),
        "tokens/s": tuple(tokens / s for s in reversed(step)),
        "steps": (steps_per_epoch, run_steps),
        "communication": (setup.accumulation * comm[0] + comm[1]) / rate,
        "link": said,
        "nodes": network.nodes(setup.gpus),
    }


def teacher_pass(images: int, nodes: int = 1) -> tuple[float, float]:
    """(fast, slow) seconds of the teacher's pass: the measured start, then ``images`` at the measured rate per
    node (a node's ranks share the CPUs running the processor)."""
    start = teacher_start()
    spread = images / (teacher_rate() * nodes)
    return start.low + spread, start.high + spread
