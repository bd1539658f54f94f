"""The alignment monitor (``hera_monitor_*``): the aligned heads' MKNN with the teacher during a HeRA run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import base_recipe, read_log_history, read_trainer_log, run_train, run_verb
from plot_checks import legend_clearance

HEADS = ["L1H0", "L1H2"]
# 32 steps of 8 pairs (8 epochs of the 32 fixture pairs), lambda 1, learning rate 5e-3: the aligned heads move within
# the run on the tiny Qwen3-VL. Scored in multimodal mode (image + caption through the MLLM, pooled over the answer as
# HeRA trains them). Measured on this CPU: with HeRA 0.719 -> 0.828 at step 32, lambda-0 twin 0.719 -> 0.734.
RISE = dict(max_steps=32, logging_steps=8, hera_monitor_steps=8, hera_lambda=1.0, hera_k=3, hera_heads=HEADS,
            learning_rate=5e-3, hera_select_mode="multimodal")


def _points(out: Path) -> list[dict]:
    return [line for line in read_trainer_log(out) if "hera_mknn" in line]


def test_aligned_heads_rise_with_hera_and_stay_flat_without(assets, tmp_path: Path, capfd) -> None:
    """Points at steps 0, 8, ..., 32 in trainer_log.jsonl and trainer_state.json; with HeRA the aligned heads' MKNN
    rises well above its start and above the lambda-0 twin's, which stays near its start. The point at step 0 is
    `select --report`'s "before" of the same heads on the same pairs; a run with the monitor off logs the same
    losses (the monitor changes no numerics)."""
    runs = {}
    for name, lam in (("hera", 1.0), ("twin", 0.0)):
        out = tmp_path / name / "out"
        proc = run_train(base_recipe(assets, "qwen3_vl", out, **{**RISE, "hera_lambda": lam}), tmp_path / name)
        runs[name] = out
        assert "alignment monitor at step 0 and every 8 steps on 32 training pairs (no val_size / eval_dataset), " \
               "multimodal mode, k 3, control heads [" in proc.stdout
    hera, twin = _points(runs["hera"]), _points(runs["twin"])
    assert [p["current_steps"] for p in hera] == [0, 8, 16, 24, 32] == [p["current_steps"] for p in twin]
    for point in hera:
        assert set(point) >= {"hera_mknn", "hera_mknn/L1H0", "hera_mknn/L1H2", "hera_mknn_control"}
        assert point["hera_mknn"] == pytest.approx((point["hera_mknn/L1H0"] + point["hera_mknn/L1H2"]) / 2)
    assert "loss" not in hera[0] and all("loss" in p for p in hera[1:])  # later points share the training line
    assert hera[0]["hera_mknn"] == twin[0]["hera_mknn"]  # same model at step 0
    start, end, twin_end = hera[0]["hera_mknn"], hera[-1]["hera_mknn"], twin[-1]["hera_mknn"]
    print(f"\nhera_mknn with HeRA {[p['hera_mknn'] for p in hera]}\nlambda 0 {[p['hera_mknn'] for p in twin]}\n"
          f"control with HeRA {[p['hera_mknn_control'] for p in hera]}")
    assert end >= start + 0.06 and end >= twin_end + 0.05
    assert abs(twin_end - twin[0]["hera_mknn"]) <= 0.05
    history = [entry for entry in read_log_history(runs["hera"]) if "hera_mknn" in entry]  # what report_to gets
    assert [entry["step"] for entry in history] == [0, 8, 16, 24, 32]

    report = run_verb(capfd, "select", "--report", runs["hera"], "--samples", "256", "--k", "3", "--device", "cpu",
                      cwd=tmp_path)
    assert report.returncode == 0, report.stderr[-3000:]
    before = json.loads((runs["hera"] / "hera_report.json").read_text())
    assert before["num_pairs"] == 32
    for head in HEADS:
        layer, index = int(head[1]), int(head[3])
        assert hera[0][f"hera_mknn/{head}"] == before["before"][layer][index], head

    off = tmp_path / "off" / "out"
    proc = run_train(base_recipe(assets, "qwen3_vl", off, **{**RISE, "hera_monitor_steps": 0}), tmp_path / "off")
    assert "alignment monitor off (hera_monitor_steps: 0)" in proc.stdout and not _points(off)
    losses = [[line["loss"] for line in read_trainer_log(out) if "loss" in line] for out in (runs["hera"], off)]
    assert losses[0] == losses[1]


def test_held_out_probe_and_default_schedule(assets, tmp_path: Path) -> None:
    """With val_size the probe pairs are the held-out rows (said in the start line); by default the monitor scores at
    step 0 and at evenly spaced steps to the last (every step of this 4-step run, the eval steps among them); the
    LlamaBoard figure draws the points."""
    out = tmp_path / "out"
    recipe = base_recipe(assets, "qwen2_5_vl", out, max_steps=4, hera_k=3, val_size=0.25, eval_strategy="steps",
                         eval_steps=2, per_device_eval_batch_size=4)
    proc = run_train(recipe, tmp_path)
    assert "alignment monitor at step 0 and 10 evenly spaced steps to the last on 8 held-out pairs (val_size 0.25)" \
           in proc.stdout
    assert [p["current_steps"] for p in _points(out)] == [0, 1, 2, 3, 4]

    from llamafactory_hera.hera.webui_panel import PANEL

    figure = PANEL.loss_figure(read_trainer_log(out), lambda values: values)
    assert len(figure.axes) == 3  # loss, MKNN, hera_loss (the loss's twin axis)
    mean = [line for line in figure.axes[1].get_lines() if line.get_label() == "aligned heads (mean)"]
    assert [list(line.get_xdata()) for line in mean] == [[0, 1, 2, 3, 4]]  # step 0's point of its own too
    clearance = legend_clearance(figure)
    assert clearance["covered_points"] == 0 and not clearance["over_axes"] and clearance["inside_figure"], clearance


def test_fixed_schedule() -> None:
    """``hera_monitor_steps: null``: step 0 and 10 evenly spaced steps, the last at the last step (every step of a
    shorter run); an explicit value: step 0 and its multiples; 0: none. The same on every rank (no clock)."""
    from llamafactory_hera.hera.monitor import monitor_steps

    assert sorted(monitor_steps(None, 1000)) == [0, 100, 200, 300, 400, 500, 600, 700, 800, 900, 1000]
    assert sorted(monitor_steps(None, 24)) == [0, 2, 5, 7, 10, 12, 14, 17, 19, 22, 24]
    assert sorted(monitor_steps(None, 4)) == [0, 1, 2, 3, 4]
    assert sorted(monitor_steps(2, 10)) == [0, 2, 4, 6, 8, 10]
    assert sorted(monitor_steps(8, 30)) == [0, 8, 16, 24]
    assert monitor_steps(0, 10) == set()


def test_probe_pairs_are_held_out_rows(assets) -> None:
    from llamafactory_hera.hera.config import parse_hera_arguments
    from llamafactory_hera.hera.monitor import probe_set
    from llamafactory_hera_patches.tools.model_data import load_aligned_rows, parse_recipe, split_rows

    recipe = base_recipe(assets, "qwen2_5_vl", Path("/tmp/unused"), val_size=0.25)
    args = parse_recipe(recipe)
    hera = parse_hera_arguments({"hera_heads": HEADS, "hera_k": 3})
    rows = load_aligned_rows(args, 0)
    probe = probe_set(hera, args, rows, seed=0)
    train, _, _ = split_rows(args, 0, rows)
    trained = {image for row in train for image in row["_images"]}
    assert len(probe.pairs) == 8 and not trained & {image for pair in probe.pairs for image in pair.images}
    assert probe_set(parse_hera_arguments({"hera_heads": HEADS, "hera_monitor_steps": 0}), args, rows, 0) is None
    few = parse_hera_arguments({"hera_heads": HEADS, "hera_k": 10, "hera_monitor_steps": 5})
    with pytest.raises(ValueError, match=r"hera_monitor_steps: got 5, but the monitor has only 6 usable image-caption "
                                         r"pairs .* the held-out rows \(val_size 0.25\) give 2 usable pairs"):
        probe_set(few, args, rows.select(range(8)), seed=0)


def test_control_heads_share_the_aligned_layers() -> None:
    from llamafactory_hera.heads.geometry import parse_head
    from llamafactory_hera.hera.monitor import control_heads

    aligned = [parse_head(h) for h in ("L1H0", "L1H2", "L3H1")]
    control = control_heads(aligned, 4, seed=0)
    assert control == control_heads(aligned, 4, seed=0) and len(control) == 3
    assert sorted(ref.layer for ref in control) == [1, 1, 3] and not set(control) & set(aligned)
    full = [parse_head(f"L0H{h}") for h in range(4)]
    assert control_heads(full, 4, seed=0) == []  # no unaligned head left in the layer


def test_monitor_keys_are_checked() -> None:
    from llamafactory_hera.hera.config import parse_hera_arguments

    assert parse_hera_arguments({"hera_heads": HEADS}).hera_monitor_steps is None
    assert parse_hera_arguments({"hera_heads": HEADS, "hera_monitor_steps": "5"}).hera_monitor_steps == 5
    assert parse_hera_arguments({"hera_heads": HEADS, "hera_monitor_steps": "null"}).hera_monitor_steps is None
    with pytest.raises(ValueError, match=r"hera_monitor_steps: got -1; allowed range is >= 0"):
        parse_hera_arguments({"hera_heads": HEADS, "hera_monitor_steps": -1})
    with pytest.raises(ValueError, match=r"hera_monitor_pairs: got 5; the monitor's MKNN with hera_k=10 needs at "
                                         r"least 11 pairs"):
        parse_hera_arguments({"hera_heads": HEADS, "hera_monitor_pairs": 5})
    assert parse_hera_arguments({"hera_heads": HEADS, "hera_monitor_pairs": 5, "hera_monitor_steps": 0})
