"""HeRA's optimizer step against SFT's, the two arms taking turns step by step: a 3 % question in one GPU lease.

Two worker processes, forked from this one after its imports (no second import, no CUDA in this one), train the same
recipe with the real ``run_exp``, one as ``stage: sft`` (LLaMA-Factory's defaults, as users run it), one as
``stage: hera``, both resident at once, and take turns: one optimizer step of one arm, then one of the other, in ABBA
order, each starting on an idle accelerator (the other arm synchronised at its step's end). Each pair of adjacent
steps gives a HeRA/SFT ratio; after the warm-up pairs the mean ratio's 95 % interval (t) and the ratio of the mean
steps' (bootstrap over pairs) are printed, and the table written to ``--out`` as it goes. A row ends when the
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
import gzip
import json
import math
import multiprocessing
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for _key, _value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                     "DISABLE_VERSION_CHECK": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_DISABLED": "true"}.items():
    os.environ.setdefault(_key, _value)
ARMS = ("sft", "hera")
SYNC_CALLS = {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy"}  # host waits
T975 = ((1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (5, 2.571), (6, 2.447), (7, 2.365), (8, 2.306), (9, 2.262),
        (10, 2.228), (12, 2.179), (15, 2.131), (20, 2.086), (25, 2.060), (30, 2.042), (40, 2.021), (60, 2.000),
        (120, 1.980))


@dataclass(frozen=True)
class Row:
    """One row of the table: the arms' shared step settings."""

    name: str
    batch: int
    accumulation: int
    workers: int
    logging: int
    share: float  # of the time left for the rows when this one starts
    max_pairs: int
    warmup: int  # pairs not measured (the first steps set up kernels, handles, the allocator's pools)


def rows_for(args: argparse.Namespace) -> list[Row]:
    """The rows: the shipped recipe's settings (read from recipes/qwen3_8b_hera.yaml) and the small step; tiny on a dry
    run."""
    recipe = shipped_recipe()
    if args.dry_run:
        return [Row("recipe", 4, 2, 1, 10, 0.5, 3, 1), Row("small", 4, 1, 0, 10, 1.0, 3, 1)]
    return [Row("recipe", int(recipe["per_device_train_batch_size"]), int(recipe["gradient_accumulation_steps"]),
                int(recipe["dataloader_num_workers"]), int(recipe["logging_steps"]), 0.6, 24, 1),
            Row("small", 8, 1, 0, int(recipe["logging_steps"]), 1.0, 400, 3)]


def shipped_recipe() -> dict[str, Any]:
    """recipes/qwen3_8b_hera.yaml's keys (the headline's settings)."""
    import yaml

    return yaml.safe_load((REPO / "recipes" / "qwen3_8b_hera.yaml").read_text())


def t975(df: int) -> float:
    """Student's t 97.5 % quantile for ``df`` degrees of freedom (a table, linear in 1/df between its entries)."""
    if df >= 120:
        return 1.960 + (1.980 - 1.960) * 120 / df
    for (d0, t0), (d1, t1) in zip(T975, T975[1:], strict=False):
        if d0 <= df <= d1:
            w = (1 / df - 1 / d1) / (1 / d0 - 1 / d1)
            return t1 + w * (t0 - t1)
    return T975[0][1]


def intervals(pairs: list[tuple[float, float]], seed: int = 0) -> dict[str, float]:
    """Of (sft, hera) step pairs: the mean HeRA/SFT ratio and its 95 % t-interval's half-width, the ratio of the mean
    steps with a bootstrap 95 % interval over pairs (2,000 resamples), and the median pair ratio."""
    ratios = [h / s for s, h in pairs]
    n = len(ratios)
    mean = statistics.fmean(ratios)
    half = t975(n - 1) * statistics.stdev(ratios) / math.sqrt(n) if n > 1 else math.inf
    rng = random.Random(seed)
    boot = []
    for _ in range(2000):
        sample = [pairs[rng.randrange(n)] for _ in range(n)]
        boot.append(sum(h for _, h in sample) / sum(s for s, _ in sample))
    boot.sort()
    of_means = sum(h for _, h in pairs) / sum(s for s, _ in pairs)
    return {"pairs": n, "mean_ratio": mean, "t_half": half, "ratio_of_means": of_means, "boot_lo": boot[49],
            "boot_hi": boot[1949], "median_ratio": statistics.median(ratios)}


# ----------------------------------------------------------------------------------------------- the workers


def bench_recipe(assets: Any, stage: str, row: Row, out: str, device: str) -> dict[str, Any]:
    """The recipe both arms train (``stage`` apart), LoRA and HeRA keys from the shipped recipe."""
    shipped = shipped_recipe()
    recipe = {
        "model_name_or_path": str(assets.model), "stage": stage, "do_train": True, "finetuning_type": "lora",
        "lora_target": "all", "lora_rank": shipped["lora_rank"], "lora_alpha": shipped["lora_alpha"],
        "dataset": "hera_bench_rows", "dataset_dir": str(assets.dataset_dir), "template": assets.template,
        "cutoff_len": assets.preset.cutoff_len, "overwrite_cache": True, "preprocessing_num_workers": 4,
        "dataloader_num_workers": row.workers, "per_device_train_batch_size": row.batch,
        "gradient_accumulation_steps": row.accumulation, "learning_rate": shipped["learning_rate"], "max_steps": 10000,
        "lr_scheduler_type": "constant", "logging_steps": row.logging, "save_strategy": "no", "output_dir": out,
        "overwrite_output_dir": True, "report_to": "none", "seed": 0, "bf16": device != "cpu", "disable_tqdm": True,
    }
    if stage == "hera":
        recipe.update({key: shipped[key] for key in ("hera_k", "hera_lambda", "hera_temperature",
                                                     "hera_learn_temperature", "hera_pooling", "hera_similarity")})
        recipe.update({"hera_heads": assets.hera_heads(), "hera_teacher": str(assets.teacher),
                       "hera_teacher_precompute": "true", "hera_monitor_steps": 0})
        if row.batch <= recipe["hera_k"]:  # a dry run's small batch: k below it, no queue
            recipe["hera_k"] = row.batch - 1
    if device == "cpu":
        recipe["use_cpu"] = True
    return recipe


def turns(conn: Any, cuda: bool, trace_dir: Path, label: str) -> Any:
    """A ``TrainerCallback`` that runs one optimizer step per command from ``conn`` (``go``, ``profile``, ``stop``)
    and sends each step's record back."""
    import torch
    from transformers import TrainerCallback

    class Turns(TrainerCallback):
        def __init__(self) -> None:
            self.start = 0.0
            self.profiler: Any = None
            self.events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) if cuda else None

        def _begin(self, control: Any) -> None:
            command = conn.recv()
            if command == "stop":
                control.should_training_stop = True
                return
            if command == "profile":
                activities = [torch.profiler.ProfilerActivity.CPU] + (
                    [torch.profiler.ProfilerActivity.CUDA] if cuda else [])
                self.profiler = torch.profiler.profile(activities=activities)
                self.profiler.__enter__()
            self.start = time.perf_counter()
            if self.events:
                self.events[0].record()

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            conn.send(("ready", {"pid": os.getpid()}))
            self._begin(control)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            issued = time.perf_counter()
            if self.events:
                self.events[1].record()
                torch.cuda.synchronize()
            end = time.perf_counter()
            record = {"step": state.global_step, "wall": end - self.start, "issue": issued - self.start}
            if self.events:
                record["gpu_span"] = self.events[0].elapsed_time(self.events[1]) / 1e3
            if self.profiler is not None:
                self.profiler.__exit__(None, None, None)
                record["profile"] = profile_summary(self.profiler, trace_dir / f"trace_{label}.json", end - self.start)
                self.profiler = None
            conn.send(("step", record))
            self._begin(control)

    return Turns()


def arm(conn: Any, stage: str, row: Row, args: argparse.Namespace, trace_dir: Path) -> None:
    """A worker: one arm's run, its steps on command; its output to a log file (``args.logs``)."""
    log = open(Path(args.logs) / f"worker_{row.name}_{stage}.log", "w")  # noqa: SIM115 - open for the process's life
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    try:
        from assets import build_bench_assets
        from llamafactory.train.tuner import run_exp

        assets = build_bench_assets(Path(args.assets), num_images=args.images, preset=args.preset)
        with tempfile.TemporaryDirectory() as out:
            run_exp(bench_recipe(assets, stage, row, out, args.device),
                    callbacks=[turns(conn, args.device != "cpu", trace_dir, f"{row.name}_{stage}")])
        conn.send(("done", None))
    except BaseException as error:  # the parent reports it with this log's tail
        conn.send(("failed", f"{type(error).__name__}: {error}"))
        raise


def profile_summary(profiler: Any, trace: Path, wall: float) -> dict[str, Any]:
    """The profiled step's GPU busy time (union of kernel, copy and memset intervals), the host's waits in
    synchronising CUDA calls, counts, and its ops' self CPU and CUDA times (from the exported trace and the
    profiler's averages); the trace is kept gzipped."""
    ops = {}
    for event in profiler.key_averages():
        ops[event.key] = {"count": event.count, "cpu_us": event.self_cpu_time_total,
                          "cuda_us": getattr(event, "self_device_time_total", 0.0)}
    profiler.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text()).get("traceEvents", [])
    with open(trace, "rb") as raw, gzip.open(f"{trace}.gz", "wb", compresslevel=6) as packed:
        shutil.copyfileobj(raw, packed)
    trace.unlink()
    spans = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in events
                   if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    busy, end = 0.0, -math.inf
    for start, stop in spans:
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    waits = [e for e in events if e.get("cat") == "cuda_runtime" and e.get("name") in SYNC_CALLS]
    waited = sum(e.get("dur", 0) for e in waits) / 1e6
    return {"gpu_busy": busy / 1e6, "host": wall - waited, "waited": waited, "syncs": len(waits),
            "kernels": sum(e.get("cat") == "kernel" for e in events), "ops": ops}


# ----------------------------------------------------------------------------------------------- the parent


class Report:
    """The table and the step log in ``out``, rewritten as rows progress."""

    def __init__(self, out: Path, header: str) -> None:
        self.out, self.header = out, header
        self.rows: dict[str, str] = {}
        self.notes: list[str] = []
        out.mkdir(parents=True, exist_ok=True)
        self.steps = open(out / "step_ab_steps.jsonl", "a")  # noqa: SIM115 - appended as steps come

    def step(self, row: str, pair: int, arm: str, record: dict[str, Any]) -> None:
        line = {"row": row, "pair": pair, "arm": arm, **{k: v for k, v in record.items() if k != "profile"}}
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
    sys.path.insert(0, str(BENCH))
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
