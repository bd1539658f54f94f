"""HeRA's optimizer step against SFT's, the two arms taking turns step by step: a 3 % question in one GPU lease.

Two worker processes (bench/step_ab_arm.py), forked from this one after its imports (no second import, no CUDA in
this one), train the same recipe with the real ``run_exp``, one as ``stage: sft`` (LLaMA-Factory's defaults, as users
run it), one as ``stage: hera``, both resident at once, and take turns: one optimizer step of one arm, then one of the
other, in ABBA order, each starting on an idle accelerator (the other arm synchronised at its step's end). Each pair
of adjacent steps gives a HeRA/SFT ratio; after the warm-up pairs the mean ratio's 95 % interval (t) and the ratio of
the mean steps' (bootstrap over pairs) are printed, and the table written to ``--out`` as it goes. A row ends when the
interval is within ``--target`` after ``--min-pairs``, or when its share of ``--budget`` is spent; then one step of
each arm runs under ``torch.profiler``.

Rows (the model and teacher of ``--preset``, random weights; LoRA and HeRA's keys as ``recipes/qwen3_8b_hera.yaml``
sets them: LoRA r 8, alpha 16 on all linear layers, hera_k 10, lambda 0.01, the learned temperature 0.07; the preset's
5 heads spread over the depth; the teacher's features computed before step 1; the alignment monitor off):

- ``recipe``: the recipe's own step, micro-batch 16 x accumulation 8, 4 dataloader workers, logging every 10 steps;
- ``small``: the host-bound small step, micro-batch 8 x 1, no dataloader worker, logging every 10 steps.

Per optimizer step: the wall time (the turn's start to the step's end, accelerator synchronised; data loading and the
collator included), the host's issue time (to its last call before that synchronisation); on the profiled steps: the
GPU's busy time (the union of its kernels' intervals), the host's time (the wall time less its waits in synchronising
CUDA calls: ``cuda*Synchronize``, blocking copies), kernels, syncs, and the largest differences by op of self CPU
time and self CUDA time. Files in ``--out``: ``step_ab.md`` (the table), ``step_ab_steps.jsonl`` (every step),
``step_ab_ops.md`` (the differences by op), ``trace_<row>_<arm>.json.gz`` (the profiled steps' traces).

Usage (GPU: ``bash bench/gpu.sh step``): python bench/step_ab.py --device cuda --preset qwen3-vl-8b --out $OUT
Dry run on a CPU (what the test runs): python bench/step_ab.py --dry-run --out DIR
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from scipy import stats  # a dependency of LLaMA-Factory
from step_ab_arm import Row, arm, shipped_recipe  # bench/ is on sys.path: the script's own folder

for _key, _value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                     "DISABLE_VERSION_CHECK": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_DISABLED": "true"}.items():
    os.environ.setdefault(_key, _value)
ARMS = ("sft", "hera")


def rows_for(args: argparse.Namespace) -> list[Row]:
    """The rows: the shipped recipe's settings (read from recipes/qwen3_8b_hera.yaml) and the small step; tiny on a dry
    run."""
    recipe = shipped_recipe()
    if args.dry_run:
        return [Row("recipe", 4, 2, 1, 10, 0.5, 3, 1), Row("small", 4, 1, 0, 10, 1.0, 3, 1)]
    return [Row("recipe", int(recipe["per_device_train_batch_size"]), int(recipe["gradient_accumulation_steps"]),
                int(recipe["dataloader_num_workers"]), int(recipe["logging_steps"]), 0.6, 24, 1),
            Row("small", 8, 1, 0, int(recipe["logging_steps"]), 1.0, 400, 3)]


def intervals(pairs: list[tuple[float, float]], seed: int = 0) -> dict[str, float]:
    """Of (sft, hera) step pairs: the mean HeRA/SFT ratio and its 95 % t-interval's half-width, the ratio of the mean
    steps with a bootstrap 95 % interval over pairs (2,000 resamples), and the median pair ratio."""
    ratios = [h / s for s, h in pairs]
    n = len(ratios)
    mean = statistics.fmean(ratios)
    half = stats.t.ppf(0.975, n - 1) * statistics.stdev(ratios) / math.sqrt(n) if n > 1 else math.inf
    rng = random.Random(seed)
    boot = []
    for _ in range(2000):
        sample = [pairs[rng.randrange(n)] for _ in range(n)]
        boot.append(sum(h for _, h in sample) / sum(s for s, _ in sample))
    boot.sort()
    of_means = sum(h for _, h in pairs) / sum(s for s, _ in pairs)
    return {"pairs": n, "mean_ratio": mean, "t_half": half, "ratio_of_means": of_means, "boot_lo": boot[49],
            "boot_hi": boot[1949], "median_ratio": statistics.median(ratios)}


class Report:
    """The table and the step log in ``out``, rewritten as rows progress."""

    def __init__(self, out: Path, header: str) -> None:
        self.out, self.header = out, header
        self.rows: dict[str, str] = {}
        self.notes: list[str] = []
        out.mkdir(parents=True, exist_ok=True)
        self.steps = open(out / "step_ab_steps.jsonl", "a")  # noqa: SIM115 - appended as steps come

    def step(self, row: str, pair: int, stage: str, record: dict[str, Any]) -> None:
        line = {"row": row, "pair": pair, "arm": stage, **{k: v for k, v in record.items() if k != "profile"}}
        self.steps.write(json.dumps(line) + "\n")
        self.steps.flush()

    def set_row(self, name: str, line: str) -> None:
        self.rows[name] = line
        self.write()

    def write(self) -> None:
        table = [self.header, "",
                 "| row | pairs | SFT step (ms, median) | HeRA step | HeRA/SFT, mean of pair ratios, 95 % t-interval | "
                 "ratio of mean steps, 95 % bootstrap | median pair ratio | host issue SFT / HeRA (ms) |",
                 "|---|---:|---:|---:|---|---|---:|---|", *self.rows.values(), "", *self.notes]
        (self.out / "step_ab.md").write_text("\n".join(table) + "\n")


def row_line(row: Row, pairs: list[tuple[dict, dict]]) -> tuple[str, dict[str, float]]:
    """The table's line of ``row`` from its measured pairs, and its intervals."""
    walls = [(s["wall"], h["wall"]) for s, h in pairs]
    stats = intervals(walls)
    sft, hera = (statistics.median(w[i] for w in walls) * 1e3 for i in (0, 1))
    issue = [statistics.median(p[i]["issue"] for p in pairs) * 1e3 for i in (0, 1)]
    label = f"{row.name}: micro-batch {row.batch} x {row.accumulation}, {row.workers} workers, logging {row.logging}"
    return (f"| {label} | {stats['pairs']} | {sft:.1f} | {hera:.1f} | {stats['mean_ratio']:.4f} "
            f"± {stats['t_half']:.4f} | {stats['ratio_of_means']:.4f} [{stats['boot_lo']:.4f}, {stats['boot_hi']:.4f}]"
            f" | {stats['median_ratio']:.4f} | {issue[0]:.1f} / {issue[1]:.1f} |"), stats


def run_row(row: Row, args: argparse.Namespace, report: Report, deadline: float, trace_dir: Path) -> None:
    """Start both arms of ``row``, alternate their steps until the interval or the time is reached, profile one step
    of each, stop them."""
    context = multiprocessing.get_context("fork")
    conns, procs = {}, {}
    for stage in ARMS:
        parent, child = context.Pipe()
        # not a daemon: a worker starts processes of its own (dataloader workers, the dataset's preprocessing)
        procs[stage] = context.Process(target=arm, args=(child, stage, row, args, trace_dir))
        procs[stage].start()
        conns[stage] = parent

    def receive(stage: str, timeout: float) -> tuple[str, Any]:
        if not conns[stage].poll(max(timeout, 1.0)):
            raise TimeoutError(f"{row.name} {stage}: no answer in {timeout:.0f} s\n{tail(args, row, stage)}")
        try:
            kind, value = conns[stage].recv()
        except EOFError:  # the worker ended without a word
            kind, value = "failed", f"ended (exit code {procs[stage].exitcode})"
        if kind == "failed":
            raise RuntimeError(f"{row.name} {stage} failed: {value}\n{tail(args, row, stage)}")
        return kind, value

    started = time.perf_counter()
    try:
        for stage in ARMS:
            receive(stage, deadline - time.perf_counter())
        print(f"{row.name}: both arms ready after {time.perf_counter() - started:.1f} s", flush=True)
        measured: list[tuple[dict, dict]] = []
        pair = 0
        while True:
            records = {}
            for stage in ARMS if pair % 2 == 0 else ARMS[::-1]:  # ABBA: a drift in time cancels
                conns[stage].send("go")
                records[stage] = receive(stage, deadline - time.perf_counter())[1]
                report.step(row.name, pair, stage, records[stage])
            pair += 1
            if pair <= row.warmup:
                continue
            measured.append((records["sft"], records["hera"]))
            line, stats = row_line(row, measured)
            report.set_row(row.name, line)
            print(line, flush=True)
            pair_time = records["sft"]["wall"] + records["hera"]["wall"]
            done = stats["pairs"] >= args.min_pairs and stats["t_half"] <= args.target
            if done or stats["pairs"] >= row.max_pairs or deadline - time.perf_counter() < 1.5 * pair_time:
                break
        profiled = {}
        for stage in ARMS:
            conns[stage].send("profile")
            profiled[stage] = receive(stage, deadline + args.profile_reserve - time.perf_counter())[1]
            report.step(row.name, -1, stage, profiled[stage])
        report.notes.extend(profile_lines(row, profiled, args.top))
        report.write()
        for stage in ARMS:
            conns[stage].send("stop")
    finally:
        for stage in ARMS:  # a stopped arm saves its adapter and ends; one still running after that is ended
            procs[stage].join(timeout=20)
            if procs[stage].is_alive():
                procs[stage].kill()
                procs[stage].join()


def tail(args: argparse.Namespace, row: Row, stage: str, lines: int = 30) -> str:
    """The last lines of a worker's log."""
    path = Path(args.logs) / f"worker_{row.name}_{stage}.log"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else ""


def profile_lines(row: Row, profiled: dict[str, dict], top: int) -> list[str]:
    """The profiled steps' figures and the largest differences by op, as Markdown lines."""
    sft, hera = profiled["sft"]["profile"], profiled["hera"]["profile"]
    lines = [f"### {row.name}: one profiled optimizer step of each arm (the profiler's overhead included)", "",
             "| arm | wall (ms) | GPU busy (ms) | host (ms, wall less waits) | waits (ms) | syncs | kernels |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, record in (("SFT", profiled["sft"]), ("HeRA", profiled["hera"])):
        p = record["profile"]
        lines.append(f"| {name} | {record['wall'] * 1e3:.1f} | {p['gpu_busy'] * 1e3:.1f} | {p['host'] * 1e3:.1f} | "
                     f"{p['waited'] * 1e3:.1f} | {p['syncs']} | {p['kernels']} |")
    names = set(sft["ops"]) | set(hera["ops"])
    for key, what in (("cpu_us", "self CPU time"), ("cuda_us", "self CUDA time")):
        deltas = sorted(((hera["ops"].get(n, {}).get(key, 0.0) - sft["ops"].get(n, {}).get(key, 0.0), n)
                         for n in names), key=lambda d: -abs(d[0]))
        lines += ["", f"{row.name}: HeRA minus SFT, {what}, the {top} largest differences by op", "",
                  "| op | HeRA - SFT (ms) | calls SFT / HeRA |", "|---|---:|---|"]
        for delta, name in deltas[:top]:
            counts = f"{sft['ops'].get(name, {}).get('count', 0)} / {hera['ops'].get(name, {}).get('count', 0)}"
            lines.append(f"| `{name}` | {delta / 1e3:+.3f} | {counts} |")
    return lines + [""]


def repeated_rows(assets: Any, rows: int) -> None:
    """``hera_bench_rows``: the assets' image-caption pairs repeated, shuffled, to ``rows`` rows (every step of a row
    inside one epoch: no dataloader restart among the measured steps)."""
    info_path = assets.dataset_dir / "dataset_info.json"
    info = json.loads(info_path.read_text())
    base = json.loads((assets.dataset_dir / info["hera_demo"]["file_name"]).read_text())
    rng = random.Random(0)
    repeated = [base[i % len(base)] for i in range(rows)]
    rng.shuffle(repeated)
    (assets.dataset_dir / "hera_bench_rows.json").write_text(json.dumps(repeated))
    info["hera_bench_rows"] = {**info["hera_demo"], "file_name": "hera_bench_rows.json"}
    info_path.write_text(json.dumps(info, indent=2))


def build(args: argparse.Namespace, rows: int) -> None:
    """The assets (in a child process: drawing the weights on the GPU initialises CUDA, which a forked worker could
    not use after this one had) and the repeated rows."""
    from assets import build_bench_assets

    assets = build_bench_assets(Path(args.assets), num_images=args.images, preset=args.preset)
    repeated_rows(assets, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", default="qwen3-vl-8b")
    parser.add_argument("--images", type=int, default=256, help="distinct images (the rows repeat them)")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for everything, the asset build included")
    parser.add_argument("--target", type=float, default=0.015, help="stop a row when the t-interval's half-width is "
                        "at most this (a ratio)")
    parser.add_argument("--min-pairs", type=int, default=8)
    parser.add_argument("--profile-reserve", type=float, default=60.0, help="seconds kept for the profiled steps")
    parser.add_argument("--top", type=int, default=15, help="differences by op listed")
    parser.add_argument("--rows", nargs="+", choices=["recipe", "small"], help="default: both")
    parser.add_argument("--dry-run", action="store_true", help="CPU, qwen3-vl-8b-smoke, tiny rows, 3 pairs each")
    parser.add_argument("--out", default=os.environ.get("OUT", "step_ab_out"))
    parser.add_argument("--assets", default=str(Path(tempfile.gettempdir()) / "hera_bench_assets"))
    parser.add_argument("--logs", help="the workers' logs (default: a temporary folder; a failure prints their tails)")
    args = parser.parse_args()
    started = time.perf_counter()
    if args.dry_run:
        args.device, args.preset, args.images, args.min_pairs = "cpu", "qwen3-vl-8b-smoke", 16, 3
        args.budget, args.profile_reserve = 7200.0, 600.0  # the rows end at their 3 pairs, not at a deadline
    args.logs = args.logs or tempfile.mkdtemp(prefix="step_ab_logs_")
    Path(args.logs).mkdir(parents=True, exist_ok=True)
    import llamafactory.train.tuner  # noqa: F401 - imported once here, before the workers fork
    import torch
    import transformers

    rows = [row for row in rows_for(args) if args.rows is None or row.name in args.rows]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    context = multiprocessing.get_context("fork")
    needed = max(row.batch * row.accumulation * (row.max_pairs + row.warmup + 2) for row in rows)
    builder = context.Process(target=build, args=(args, needed))
    builder.start()
    builder.join()
    if builder.exitcode != 0:
        raise SystemExit(f"asset build failed (exit {builder.exitcode})")
    header = (f"# HeRA against SFT, turn by turn: preset {args.preset}, device {args.device}; torch "
              f"{torch.__version__}, transformers {transformers.__version__}; assets built in "
              f"{time.perf_counter() - started:.0f} s")
    report = Report(out, header)
    report.write()
    print(header, flush=True)
    failed = False
    for index, row in enumerate(rows):
        left = args.budget - (time.perf_counter() - started) - args.profile_reserve * (len(rows) - index)
        deadline = time.perf_counter() + max(left * row.share, 30.0)
        try:
            run_row(row, args, report, deadline, out)
        except (RuntimeError, TimeoutError) as error:  # the table keeps what the row measured; the next row runs
            report.notes.append(f"row {row.name} stopped: {error}")
            report.write()
            print(f"row {row.name} stopped: {error}", flush=True)
            failed = True
    report.notes.append(f"whole run {time.perf_counter() - started:.0f} s")
    report.write()
    print((out / "step_ab.md").read_text(), flush=True)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
