"""The counts behind ``llamafactory-hera plan``'s time (llamafactory_hera/plan/measured.py): the FLOPs and aten ops
of one micro-step of the recipe the GPU leases measured, counted again by plan's own counter, against the table's
figures; then what the table gives (a host's cost per op, the compute's floor, the teacher's pass) and each lease's
runs predicted from the other leases alone (held out).

    .venv/bin/python bench/cost_measured.py            # about 2 minutes on one core

The measured recipe: bench/overhead.py's on the Qwen3-VL-8B architecture (tests/plan_configs.py's published config),
bf16 (and 4-bit for QLoRA), LoRA r 8 on every linear layer, micro-batch 8 of 230-token rows with one 448 px image,
reentrant checkpointing; HeRA with the bench's 5 heads (4 layers of 36), k 7, lambda 0.01. Exit 1 if a count moved
by more than 0.5 % from the table's (update the table and docs/cost.md with it).
"""

from __future__ import annotations

import importlib.util
import statistics
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HEADS = ["L35H1", "L17H5", "L9H2", "L35H7", "L22H0"]  # bench/assets.py's five heads on 36 layers
MODEL = "Qwen/Qwen3-VL-8B-Instruct"


def count_table() -> dict[tuple[str, str], tuple[float, float]]:
    """(kind, arm) -> (FLOPs, aten ops) of one micro-step of the measured recipe, counted now."""
    import huggingface_hub.constants
    from transformers import AutoConfig

    from llamafactory_hera.plan import count
    from llamafactory_hera.plan.measured import ROW_TOKENS, ROWS

    # loaded from its file, as tests/hera/test_hera_bench.py loads bench's helpers: no sys.path into tests/
    spec = importlib.util.spec_from_file_location("hera_plan_configs", REPO / "tests" / "plan_configs.py")
    plan_configs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plan_configs)
    with tempfile.TemporaryDirectory() as folder:
        huggingface_hub.constants.HF_HUB_CACHE = str(plan_configs.hub_cache(Path(folder)))
        config = AutoConfig.from_pretrained(MODEL, local_files_only=True)
    heads, layers = count.head_layers(HEADS, len(HEADS))
    out = {}
    for kind in ("lora", "qlora"):
        shape = count.Shape(ROWS, ROW_TOKENS, 448 * 448, 8, 16, kind == "qlora", True)
        hera = count.Shape(**{**shape.__dict__, "hera": {"hera_lambda": 0.01, "hera_k": 7, "heads": heads}})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            counted = count.scaled(config, {"sft": shape, "hera": hera}, layers)
        out |= {(kind, arm): (figures["flops"], figures["ops"]) for arm, figures in counted.items()}
    return out


def held_out() -> list[str]:
    """Each lease's runs against the host figure the other leases give (its kind's runs elsewhere)."""
    from llamafactory_hera.plan import measured

    lines = []
    for lease in sorted({step.lease for step in measured.STEPS}, key=lambda lease: lease.date):
        mine = [step for step in measured.STEPS if step.lease == lease]
        for kind in sorted({step.kind for step in mine}):
            for arm in sorted({step.arm for step in mine if step.kind == kind}):
                got = [step.median_ms for step in mine if step.kind == kind and step.arm == arm]
                others = [s.seconds_per_op for s in measured.STEPS if s.lease != lease and s.kind == kind]
                ops = measured.COUNTED[kind, arm.split()[0]][1]
                if not others:  # the other kind's runs (their own counted ops), on every lease
                    others = [s.seconds_per_op for s in measured.STEPS if s.kind != kind]
                    arm = f"{arm} (from the other kind: no other lease measured {kind})"
                low = ops * min(others) * 1e3
                mid = ops * statistics.median(others) * 1e3
                high = ops * max(others) * 1e3
                lines.append(
                    f"  {lease.card} {lease.date}, {kind} {arm}: measured {min(got):.1f}-{max(got):.1f} ms; from the "
                    f"other leases {low:.0f}-{high:.0f} ms (median {mid:.0f}, {mid / statistics.median(got) - 1:+.0%})"
                )
    rate = measured.teacher_rate()
    for row in measured.TEACHER:
        if row.warm:
            continue
        starts = [r.seconds - r.images / rate for r in measured.TEACHER if not r.warm and r.lease != row.lease]
        low = min(starts) + row.images / rate
        high = max(starts) + row.images / rate
        lines.append(
            f"  teacher pass, {row.lease.card} {row.lease.date} ({row.commit}): measured {row.seconds:.2f} s; from "
            f"the other leases' starts {low:.2f}-{high:.2f} s ({low / row.seconds - 1:+.0%} to "
            f"{high / row.seconds - 1:+.0%}; the rate is the H100 lease's)"
        )
    return lines


def main() -> int:
    from llamafactory_hera.plan import measured

    started = time.time()
    counted = count_table()
    moved = False
    print("micro-step of the measured recipe   FLOPs (table / now)      aten ops (table / now)")
    for key, (flops, ops) in counted.items():
        table = measured.COUNTED[key]
        off = max(abs(flops / table[0] - 1), abs(ops / table[1] - 1))
        moved |= off > 0.005
        print(f"  {key[0]:6} {key[1]:5}  {table[0] / 1e12:8.2f} / {flops / 1e12:8.2f} T   {table[1]:8,} / {ops:8,.0f}"
              + ("   MOVED" if off > 0.005 else ""))
    for kind in ("lora", "qlora"):
        cost = measured.per_op(kind)
        share, source = measured.efficiency(kind)
        print(f"{kind}: host {cost.low * 1e6:.1f}-{cost.high * 1e6:.1f} us an op (median {cost.median * 1e6:.1f}; "
              f"{cost.source}); compute floor {share:.1%} ({source})")
    start = measured.teacher_start()
    print(f"teacher: start {start.low:.2f}-{start.high:.2f} s, {measured.teacher_rate():.0f} images/s ({start.source})")
    print("held out, each lease from the others:", *held_out(), sep="\n")
    print(f"counted in {time.time() - started:.0f} s")
    return 1 if moved else 0


if __name__ == "__main__":
    raise SystemExit(main())
