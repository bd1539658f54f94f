"""What the A/B benchmarks that train each measured run in its own process share (``overhead.py``, ``harc.py``).

The parent starts one worker process per run (:func:`run_worker`: offline, CPU-only on ``--device cpu``, this
folder importable) and reads the one ``BENCH {json}`` line the worker prints; the worker hands :func:`step_timer`
to ``run_exp``. Importing this module is cheap (torch and transformers are imported by :func:`step_timer`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "DISABLE_VERSION_CHECK": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_DISABLED": "true"}
RESULT_PREFIX = "BENCH "


def run_worker(script: str, stage: str, device: str, options: list[str]) -> dict:
    """Run ``script --worker stage *options`` in a new process and return the JSON of its last ``BENCH`` line;
    RuntimeError with the output's tails when it fails or prints none."""
    cmd = [sys.executable, script, "--worker", stage, *options]
    # this folder first, then the caller's path: on the GPU machine the plugin and LLaMA-Factory live in a target
    # folder on PYTHONPATH (bench/gpu.sh), which a worker that replaced the variable could not import
    path = os.pathsep.join(filter(None, [str(BENCH), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, **OFFLINE, "PYTHONPATH": path}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{stage} run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def print_result(result: dict[str, Any]) -> None:
    """The worker's one ``BENCH {json}`` line, which :func:`run_worker` reads."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def step_timer(counters: Any = None) -> Any:
    """A ``TrainerCallback`` whose ``ends`` holds ``time.perf_counter()`` at train begin and at every optimizer
    step's end (after a CUDA synchronize on a GPU), so consecutive differences are step times; ``end`` is the time at
    train end, after every callback of the last step (a callback added later, such as the alignment monitor's, runs
    after this one at each event). With ``counters`` (:class:`counters.ThreadCounters`) ``counts`` and ``end_count``
    hold their (instructions, cycles) at the same moments. On a GPU it resets the peak memory statistics at train begin
    (``peak_before_train_mb`` keeps the peak until then): see :func:`gpu_peaks`."""
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.counts: list[tuple[int, int]] = []
            self.end = float("nan")
            self.end_count: tuple[int, int] | None = None
            self.peak_before_train_mb = 0.0

        def _mark(self) -> None:
            self.ends.append(time.perf_counter())
            if counters is not None:
                self.counts.append(counters.read())

        def on_train_begin(self, *a, **k) -> None:
            if torch.cuda.is_available():  # the training's own peak apart from loading (and quantizing) the model
                self.peak_before_train_mb = torch.cuda.max_memory_allocated() / 2**20
                torch.cuda.reset_peak_memory_stats()
            self._mark()

        def on_step_end(self, *a, **k) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self._mark()

        def on_train_end(self, *a, **k) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.end = time.perf_counter()
            self.end_count = counters.read() if counters is not None else None

    return StepTimer()


def gpu_peaks(timer: Any) -> dict[str, float | None]:
    """After a run with :func:`step_timer`: ``peak_gpu_mb``, the peak ``torch.cuda.max_memory_allocated`` from train
    begin to the end (the steps; HeRA's teacher pass before step 1 runs earlier), and ``peak_gpu_process_mb``, the
    process's (loading the model, quantizing it, the teacher pass); None without a GPU."""
    import torch

    if not torch.cuda.is_available():
        return {"peak_gpu_mb": None, "peak_gpu_process_mb": None}
    training = torch.cuda.max_memory_allocated() / 2**20
    return {"peak_gpu_mb": training, "peak_gpu_process_mb": max(training, timer.peak_before_train_mb)}
