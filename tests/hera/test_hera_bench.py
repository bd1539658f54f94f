"""The benchmark scripts and their presets: real architectures as published, the GPU path runnable on a CPU."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
from dist_runs import run_python

from conftest import REPO, offline_env, run_process

BENCH = REPO / "bench"


def bench_module(name: str) -> ModuleType:
    """bench/NAME.py as module ``bench_NAME``, loaded from its file: bench/ holds scripts, not a package. While it
    loads, bench/ is first on sys.path, as for a script run from its folder (step_counts.py imports step_counter.py)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # where dataclasses look their module up while it runs
    sys.path.insert(0, str(BENCH))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


assets, counters = bench_module("assets"), bench_module("counters")
PRESETS, build_bench_assets, count_parameters = assets.PRESETS, assets.build_bench_assets, assets.count_parameters


@pytest.fixture(scope="module")
def bench_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench_assets")


@pytest.mark.parametrize("name", ["qwen3-vl-8b", "qwen2.5-vl-7b"])
def test_real_presets_have_the_published_parameter_counts(bench_root: Path, name: str) -> None:
    """Model cards: Qwen3-VL-8B 8.77B, Qwen2.5-VL-7B 8.29B parameters; DINOv2-L 304M (meta-device instances)."""
    from llamafactory_hera.fixtures import build_tiny_assets

    spec = PRESETS[name]
    tiny = build_tiny_assets(bench_root / "tiny_for_counts", models=("qwen3_vl", "qwen2_5_vl"))
    model, teacher = count_parameters(spec, tiny.models[spec.family], tiny.teacher)
    want_model, want_teacher = spec.published_params
    assert abs(model / want_model - 1) < 0.002, (name, model)
    assert abs(teacher / want_teacher - 1) < 0.002, (name, teacher)


@pytest.mark.parametrize(("name", "grid", "layers"), [("qwen3-vl-8b-smoke", (1, 28, 28), 8),
                                                      ("qwen2.5-vl-7b-smoke", (1, 32, 32), 8)])
def test_smoke_presets_keep_the_real_presets_inputs(bench_root: Path, name: str, grid: tuple, layers: int) -> None:
    """448 px images (Qwen3-VL: 28x28 patches of 16 = 196 visual tokens; Qwen2.5-VL: 32x32 of 14 = 256), bf16."""
    from PIL import Image
    from transformers import AutoProcessor

    assets = build_bench_assets(bench_root, num_images=8, preset=name)
    processor = AutoProcessor.from_pretrained(assets.model)
    out = processor.image_processor([Image.new("RGB", (48, 48))], return_tensors="pt")
    assert tuple(out["image_grid_thw"][0].tolist()) == grid
    assert json.loads((assets.model / "config.json").read_text())["dtype"] == "bfloat16"
    teacher_processor = json.loads((assets.teacher / "preprocessor_config.json").read_text())
    assert teacher_processor["crop_size"] == {"height": 224, "width": 224}
    visual_tokens = grid[1] * grid[2] // 4  # 2x2 patches merged into one token
    assert assets.preset.cutoff_len >= visual_tokens + 64  # nothing truncated: image plus prompt and caption
    assert all(int(h[1:].split("H")[0]) < layers for h in assets.hera_heads())


def test_unknown_preset_is_refused_with_the_choices(bench_root: Path) -> None:
    with pytest.raises(ValueError, match=r"--preset: unknown preset 'qwen9'; choose one of cpu-mid, qwen3-vl-8b"):
        build_bench_assets(bench_root, preset="qwen9")


def _run(tmp: Path, script: str, *args: str) -> str:
    """``python bench/SCRIPT ARGS`` in a process forked from the warm process (tests/dist_runs.py ``run_python``): the
    script's work, not its imports."""
    proc = run_python(BENCH / script, list(args), cwd=tmp, env=offline_env(tmp))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.parametrize(("option", "value", "least"), [("--repeats", "0", 1), ("--epochs", "0", 1),
                                                         ("--images", "0", 1), ("--batch", "0", 1),
                                                         ("--warmup", "-1", 0)])
def test_overhead_refuses_a_count_out_of_range_by_name(option: str, value: str, least: int, tmp_path: Path) -> None:
    """``--repeats 0`` measured nothing and ended in an IndexError; each count is one line naming the option."""
    proc = run_process([sys.executable, str(BENCH / "overhead.py"), option, value], cwd=tmp_path,
                       env=offline_env(tmp_path), timeout=120)
    assert proc.returncode == 2 and f"{option} {value}: must be at least {least}" in proc.stderr, proc.stderr[-2000:]


def test_overhead_script_runs_both_stages_and_prints_ratios(bench_root: Path) -> None:
    # a batch of k + 1 images, as the GPU command's 8 with k = 7: no queue of earlier rows (docs/hera.md)
    out = _run(bench_root, "overhead.py", "--repeats", "1", "--epochs", "2", "--images", "8", "--batch", "4",
               "--hera-k", "3", "--warmup", "0", "--step-tensors", "--preset", "qwen3-vl-8b-smoke",
               "--assets", str(bench_root))
    for label in ("step, first epoch", "step, later epochs", "step, all", "step tensors, peak", "peak RSS"):
        assert re.search(rf"^{re.escape(label)} \(\w+\)\s+[\d.]+\s+[\d.]+\s+[\d.]+", out, re.M), (label, out)
    assert "heads ['L7H1', 'L3H5', 'L2H2', 'L7H7', 'L5H0']" in out
    assert "baseline: SFT with LLaMA-Factory's defaults, as users run it (reentrant" in out  # not a tuned twin


def test_step_counts_gate_holds_on_the_smoke_preset(bench_root: Path) -> None:
    """The host's whole second step of three of the real run_exp (its batch's loading and collation, forward,
    backward, optimizer, callbacks), counted: aten ops by a dispatch mode, Python calls by ``sys.setprofile`` (in the
    next step, apart from the mode's own calls), HeRA against SFT with LLaMA-Factory's defaults. HeRA makes SFT's
    checkpoint.py calls exactly (its heads leave their reentrant checkpoint as one more output: it used to run their
    layers non-reentrant, +893 calls a layer), adds at most 1 % of SFT's step at the real depth (36 layers) in aten
    ops and in Python calls, and its extra ops do not grow from batch 4 to 8 (4 to 8 images; k 3 and 7, no queue: a
    batch of 2 holds no negative without HeRA's queue of earlier rows, a configuration of its own)."""
    step_counts = bench_module("step_counts")
    counts = bench_root / "step_counts.json"
    out = _run(bench_root, "step_counts.py", "--preset", "qwen3-vl-8b-smoke", "--batches", "4", "8", "--check",
               "--json", str(counts), "--assets", str(bench_root))
    rows = json.loads(counts.read_text())
    sft, non_reentrant, hera = (rows[k] for k in ("sft", "sft_nonreentrant", "hera"))
    assert sft["checkpoint_calls"] < non_reentrant["checkpoint_calls"], rows  # the counter sees checkpointing
    assert hera["checkpoint_calls"] == sft["checkpoint_calls"], rows
    assert 0 < hera["ops"] - sft["ops"] <= step_counts.OPS_LIMIT <= 300, rows
    assert 0 < hera["calls"] - sft["calls"] <= step_counts.CALLS_LIMIT <= 2300, rows
    assert rows["hera_b8"]["ops"] - rows["sft_b8"]["ops"] <= hera["ops"] - sft["ops"] + 8, rows
    assert re.search(r"^SFT \(LLaMA-Factory defaults\)\s+4\s+[\d,]+\s+[\d,]+\s+[\d,]+$", out, re.M), out
    assert re.search(r"^HeRA/SFT host work per step: aten ops 1\.\d{4}, Python calls 1\.\d{4}$", out, re.M), out
    assert "FAIL" not in out, out



def test_step_ab_dry_run_writes_the_table_the_gpu_lease_fills(tmp_path: Path) -> None:
    """bench/step_ab.py's dry run (the GPU script's path on a CPU: the arms' two resident processes taking turns,
    the ratio's intervals, the profiled steps, the traces), its small row alone: the table has the row with both
    intervals, the profiled step of each arm and the differences by op, and the files the lease brings back."""
    out = tmp_path / "out"
    printed = _run(tmp_path, "step_ab.py", "--dry-run", "--rows", "small", "--out", str(out), "--assets",
                   str(tmp_path / "assets"))
    table = (out / "step_ab.md").read_text()
    assert re.search(r"^\| small: micro-batch 4 x 1, 0 workers, logging 10 \| 3 \| [\d.]+ \| [\d.]+ \| "
                     r"[\d.]+ ± [\d.]+ \| [\d.]+ \[[\d.]+, [\d.]+\]", table, re.M), table
    assert re.search(r"^\| SFT \| [\d.]+ \|", table, re.M) and re.search(r"^\| HeRA \| [\d.]+ \|", table, re.M), table
    assert "small: HeRA minus SFT, self CPU time" in table and "whole run" in printed, printed[-3000:]
    steps = [json.loads(line) for line in (out / "step_ab_steps.jsonl").read_text().splitlines()]
    assert {step["arm"] for step in steps} == {"sft", "hera"}, steps[:4]
    assert sorted(path.name for path in out.glob("trace_*.json.gz")) == ["trace_small_hera.json.gz",
                                                                           "trace_small_sft.json.gz"]

NOT_COUNTED = re.compile(r"^instructions, cycles\s+not counted: hardware counters: \S", re.M)
SAME_STEP = re.compile(r"^steps without a point\s+instructions on/off, same step: median ([\d.]+) "
                       r"\(([\d.]+)-([\d.]+)\) over \d+ steps$", re.M)


def _check_counters(out: str) -> bool:
    """The counters' lines of ``overhead.py --monitor --counters``, either branch; True when counted."""
    counted = SAME_STEP.search(out)
    if counted is None:  # no hardware counters here (a VM without a PMU, a container, perf_event_paranoid > 2)
        assert NOT_COUNTED.search(out), out
        assert "[Errno" not in out, out
        return False
    assert all(abs(float(value) - 1) < 2e-3 for value in counted.groups()), out
    assert re.search(r"^instructions, training \(G\)\s+[\d.]+\s+[\d.]+\s+1\.0\d\d", out, re.M), out
    return True


def test_overhead_script_measures_the_monitor_side_by_side(bench_root: Path) -> None:
    """``--monitor``: HeRA with the monitor off and on (here every 2 steps), the points' share inside the run, and the
    instructions the training thread retired (or why they were not counted): equal on the step without a point."""
    out = _run(bench_root, "overhead.py", "--monitor", "--monitor-steps", "2", "--counters", "--repeats", "1",
               "--epochs", "1", "--images", "8", "--batch", "4", "--hera-k", "3", "--warmup", "0",
               "--preset", "qwen3-vl-8b-smoke",
               "--assets", str(bench_root))
    assert re.search(r"^training time \(s\)\s+[\d.]+\s+[\d.]+\s+[\d.]+", out, re.M), out
    assert re.search(r"^monitor, in its own run\s+points at steps \[0, 2\], [\d.]+ s .* % of its training time",
                     out, re.M), out
    _check_counters(out)


def _fake_libc(errno: int) -> type:
    class Libc:  # perf_event_open refused with this errno
        def __init__(self, *args: object, **kwargs: object) -> None:
            pass

        def syscall(self, *args: object) -> int:
            return -1

    return Libc


def _refuse_counters(monkeypatch: pytest.MonkeyPatch, why: str) -> None:
    """Make ``thread_counters`` find no counters: perf_event_open fails with errno ``why``, or the OS is not Linux."""
    import ctypes
    import errno
    import platform

    if why == "not Linux":
        monkeypatch.setattr(platform, "system", lambda: "Darwin")
        return
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(ctypes, "CDLL", _fake_libc(getattr(errno, why)))
    monkeypatch.setattr(ctypes, "get_errno", lambda: getattr(errno, why))


@pytest.mark.parametrize("why", ["ENOENT", "EACCES", "not Linux"])
def test_counters_unavailable_say_why_in_the_checked_words(monkeypatch: pytest.MonkeyPatch, why: str) -> None:
    """Without hardware counters (a VM without a PMU: ENOENT; perf_event_paranoid > 2: EACCES; another OS) the reason
    starts with ``hardware counters:`` (it used to start with ``[Errno 2]``, which the script's check refused)."""
    _refuse_counters(monkeypatch, why)
    found, reason = counters.thread_counters()
    assert found is None and reason.startswith("hardware counters: "), reason
    assert ("on Darwin" in reason) == (why == "not Linux") and "[Errno" not in reason, reason


def test_overhead_prints_the_counters_in_both_branches(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    """The monitor's counters table from synthetic runs: counted (same work on the step without a point) and not
    counted (with the reason thread_counters gives on a machine without them); both pass the script test's check."""
    def run(counts: list[list[int]], points: list[int], unavailable: str = "") -> dict:
        return {"counts": counts, "end_count": counts[-1] if counts else None, "monitor_steps": points,
                "torch_threads": 1, "counters_unavailable": unavailable}

    steps = [[10**9 * s, 2 * 10**9 * s] for s in range(4)]
    monitored = [[c[0] + (10**8 if s >= 1 else 0), c[1]] for s, c in enumerate(steps)]  # a point at step 0
    counters.print_monitor_counters([run(steps, [])], [run(monitored, [0])])
    assert _check_counters(capsys.readouterr().out)
    _refuse_counters(monkeypatch, "ENOENT")
    reason = counters.thread_counters()[1]
    counters.print_monitor_counters([run([], [], reason)], [run([], [0], reason)])
    assert not _check_counters(capsys.readouterr().out)


def test_selection_script_prints_ratio_breakdown_and_end_to_end(bench_root: Path) -> None:
    out = _run(bench_root, "selection.py", "--samples", "24", "--repeats", "1", "--k", "5", "--end-to-end",
               "--preset", "qwen2.5-vl-7b-smoke", "--assets", str(bench_root))
    assert re.search(r"head selection\s+[\d.]+ s\s+ratio [\d.]+", out), out
    for part in ("forward+pooling", "teacher", "scoring"):
        assert re.search(rf"^\s+{re.escape(part)}\s+[\d.]+ s$", out, re.M), (part, out)
    assert re.search(r"end to end: .* [\d.]+ s$", out, re.M), out
