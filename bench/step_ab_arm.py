"""One arm of bench/step_ab.py: a worker forked by its parent that trains the bench's recipe with the real
``run_exp`` as ``stage: sft`` or ``stage: hera`` and runs one optimizer step per command from the parent (``go``,
``profile``, ``stop``), sending back each step's wall time and the host's issue time, and on a profiled step what
``torch.profiler`` saw (:func:`profile_summary`)."""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SYNC_CALLS = {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy"}  # host waits


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


def shipped_recipe() -> dict[str, Any]:
    """recipes/qwen3_8b_hera.yaml's keys (the headline's settings)."""
    import yaml

    return yaml.safe_load((REPO / "recipes" / "qwen3_8b_hera.yaml").read_text())


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
