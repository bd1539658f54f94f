"""Plots people read: one ``training.png`` per run (losses and the method's terms on twin axes, HeRA's temperature and
alignment monitor beside them), integer step ticks, titles that name the run and fit the figure, legends for boxed
heads, and no ``-0.000`` in any text of any figure. The figures are inspected as they are saved (every Text artist
after drawing), from synthetic logs with the exact keys the runs log and from a real HeRA run's logs."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.figure import Figure
from matplotlib.text import Text

from llamafactory_hera.plots.training import plot_training, read_series

NEGATIVE_ZERO = re.compile(r"[-\u2212]0\.0+(?![0-9])")


def _smooth(values: list[float]) -> list[float]:
    from llamafactory.extras.ploting import smooth

    return smooth(values)


@pytest.fixture
def saved(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Figure]]:
    """Every figure saved while the test runs (drawn, so tick labels and layouts are final)."""
    figures: list[Figure] = []
    original = Figure.savefig

    def savefig(self: Figure, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        title = self._suptitle  # measured now: pyplot's close() takes the canvas away afterwards
        self.saved_title_box = None if title is None else title.get_window_extent(self.canvas.get_renderer())
        figures.append(self)
        return result

    monkeypatch.setattr(Figure, "savefig", savefig)
    yield figures


def _texts(fig: Figure) -> list[str]:
    return [text.get_text() for text in fig.findobj(Text) if text.get_text()]


def _check_text(fig: Figure, run_name: str | None = None, wrapped: bool = True) -> None:
    """No negative zero anywhere; the title names the run, fits inside the figure (and is one line if not
    ``wrapped``)."""
    assert not [t for t in _texts(fig) if NEGATIVE_ZERO.search(t)], _texts(fig)
    title = fig._suptitle
    assert title is not None
    if run_name is not None:
        assert run_name in title.get_text().replace("\n", "")
    if not wrapped:
        assert "\n" not in title.get_text(), title.get_text()
    box, frame = fig.saved_title_box, fig.bbox
    assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1


def _integer_ticks(fig: Figure) -> None:
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks


def _hera_log(run: Path, steps: int, monitor: bool) -> None:
    """trainer_log.jsonl with the keys a HeRA run writes (and the alignment monitor's, every 2nd step)."""
    lines = []
    for step in range(1, steps + 1):
        line = {"current_steps": step, "total_steps": steps, "loss": 6.3 - 0.03 * step, "lm_loss": 6.28 - 0.03 * step,
                "hera_loss": 2.0 - 0.02 * step, "hera_weighted_loss": 0.02, "hera_temperature": 0.07 + 1e-5 * step,
                "hera_image_samples": 8, "lr": 1e-4, "epoch": 0.1 * step, "percentage": 100 * step / steps}
        if monitor and step % 2 == 0:
            line.update({"hera_mknn": 0.3 + 0.01 * step, "hera_mknn_control": 0.28,
                         "hera_mknn/L1H0": 0.31 + 0.01 * step, "hera_mknn/L1H2": 0.29 + 0.01 * step})
        lines.append(json.dumps(line))
    run.mkdir(parents=True, exist_ok=True)
    (run / "trainer_log.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.mark.parametrize("monitor,axes", [(False, 3), (True, 4)])
def test_hera_training_plot_from_the_log(saved: list[Figure], tmp_path: Path, monitor: bool, axes: int) -> None:
    from llamafactory_hera.hera.config import TRAINING_PLOT

    run = tmp_path / "qwen3vl-lora-hera"
    _hera_log(run, 7, monitor)
    path, missing = plot_training(run, "hera", TRAINING_PLOT, _smooth)
    assert path == run / "training.png" and path.stat().st_size > 10_000 and missing == []
    assert not list(run.glob("training_*.png"))  # one figure, not one per metric
    (fig,) = saved
    assert len(fig.axes) == axes  # loss, its twin (hera_loss), temperature[, alignment]
    _check_text(fig, "qwen3vl-lora-hera", wrapped=False)
    assert "stage: hera" in fig._suptitle.get_text()
    _integer_ticks(fig)
    legend = fig.axes[0].get_legend()
    assert legend is not None and [t.get_text() for t in legend.get_texts()] == ["loss", "lm_loss", "hera_loss"]
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[:3] == ["losses (solid: left axis, dashed: right axis)", "learned temperature",
                          *(["alignment with the teacher (MKNN)"] if monitor else [""])]  # [-1]: the loss's twin
    if monitor:
        alignment = fig.axes[2]
        assert alignment.get_ylim() == (0.0, 1.0)
        labels = [t.get_text() for t in alignment.get_legend().get_texts()]
        assert labels == ["each aligned head (2)", "aligned heads (mean)", "control heads (mean)"]
        assert [list(line.get_xdata()) for line in alignment.get_lines()][3] == [2, 4, 6]  # 2 heads, a proxy, mean


def test_series_merge_the_log_and_the_trainer_state(tmp_path: Path) -> None:
    """Keys only in trainer_state.json (e.g. a monitor key the log patch does not copy), a method's own entry (the
    monitor's point at step 0) and eval_loss are read; the Trainer's summaries are not."""
    _hera_log(tmp_path, 4, monitor=False)
    history = [{"step": 0, "hera_mknn": 0.35}, {"step": 2, "loss": 6.24, "hera_mknn": 0.4},
               {"step": 2, "eval_loss": 6.5, "eval_runtime": 1.0}, {"step": 4, "train_runtime": 3.0}]
    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": history}), encoding="utf-8")
    series = read_series(tmp_path)
    assert series["hera_mknn"] == ([0, 2], [0.35, 0.4]) and series["eval_loss"] == ([2], [6.5])
    assert "eval_runtime" not in series
    assert series["loss"][0] == [1, 2, 3, 4] and "train_runtime" not in series and "epoch" not in series


def test_single_step_and_nothing_logged(saved: list[Figure], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from llamafactory_hera.harc.config import TRAINING_PLOT

    run = tmp_path / "harc-one-step"
    run.mkdir()
    line = {"current_steps": 1, "loss": 2.0, "harc_couple": -0.0, "harc_couple_resp": 0.1, "harc_kl": 0.0,
            "harc_ce": 1.9, "harc_layers": "2,3"}
    (run / "trainer_log.jsonl").write_text(json.dumps(line) + "\n", encoding="utf-8")
    plot_training(run, "harc", TRAINING_PLOT, _smooth)
    (fig,) = saved
    assert len(fig.axes) == 2 and [float(t) for t in fig.axes[0].get_xticks()] == [1.0]
    _check_text(fig, "harc-one-step", wrapped=False)
    (run / "trainer_log.jsonl").write_text(json.dumps({"current_steps": 1, "eval_loss": 1.0}) + "\n")
    capsys.readouterr()
    (run / "training.png").unlink()
    assert plot_training(run, "harc", TRAINING_PLOT, _smooth)[0] is None  # a warning, as the host's plot_loss
    assert "warning: training plot of harc-one-step: no loss" in capsys.readouterr().out
    assert len(saved) == 1 and not (run / "training.png").exists()


@pytest.mark.parametrize("stage", ["hera", "rah", "harc"])
def test_a_run_shorter_than_logging_steps_warns_and_exits_0(assets: Any, harc_assets: Any, stage: str,
                                                            tmp_path: Path) -> None:
    """A one-step smoke test (``max_steps: 1`` below ``logging_steps: 5``) logs no loss: ``llamafactory-cli train``
    exits 0, as the stock ``plot_loss`` does (it used to fail after training with ``no loss, term or
    panel series was logged``), warning that nothing was plotted (HeRA plots its monitor's points)."""
    from conftest import base_recipe, harc_recipe, run_train
    from llamafactory_hera.demo.rah import build_rah_recipe

    out = tmp_path / f"one-step-{stage}"
    short = {"max_steps": 1, "logging_steps": 5, "plot_loss": True}
    recipe = {"hera": lambda: base_recipe(assets, "qwen2_5_vl", out, **short),
              "rah": lambda: {**build_rah_recipe(assets, "qwen2_5_vl", out), **short},
              "harc": lambda: harc_recipe(harc_assets, "llama3", out, **short)}[stage]()
    proc = run_train(recipe, tmp_path, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    if stage == "harc":  # training-free: no loss to plot
        assert "warning: training plot of one-step-" in proc.stdout, proc.stdout[-3000:]
        assert "training.png not drawn" in proc.stdout and not (out / "training.png").exists()
    if stage == "hera":  # no loss either, but the alignment monitor's points at steps 0 and 1 are drawn
        assert (out / "training.png").exists(), proc.stdout[-3000:]
        assert "not logged, so not plotted: loss, lm_loss, hera_loss" in proc.stdout


def test_head_figures_say_what_boxes_and_hatching_mean(saved: list[Figure], tmp_path: Path) -> None:
    """The report's boxes and within-noise hatching have a legend; cell values never read -0.000."""
    from llamafactory_hera.plots.heads import plot_before_after, plot_head_heatmap, plot_score_panels

    before = np.array([[0.5, 0.25, 0.125, 0.5], [0.3, 0.2, 0.1, 0.0]])
    after = before + np.array([[-1e-9, 0.0, 0.0417, -0.0833], [0.0, -0.0002, 0.0, 0.0]])
    noise = np.abs(after - before) < 0.01
    plot_before_after(before, after, [(1, 0), (1, 2)], tmp_path / "report.png", "run (stage: hera): report",
                      box_label="aligned heads (hera_heads)", noise=noise, noise_label="within noise")
    plot_head_heatmap(before - 1e-9, [(0, 1)], tmp_path / "heatmap.png", "recipe: MKNN per head")
    plot_score_panels([(after - before, "I-SAL"), (before, "CAF")], [3, 4], [(3, 0)], [(4, 1)],
                      tmp_path / "profile.png", "run (stage: rah): profile", box_labels=("calibrated", "others"))
    report, heatmap, profile = saved
    for fig, labels in ((report, ["aligned heads (hera_heads)", "within noise"]), (heatmap, ["selected heads"]),
                        (profile, ["calibrated", "others"])):
        _check_text(fig)
        assert [t.get_text() for t in fig.legends[0].get_texts()] == labels
    assert "0.000" in _texts(report) and "+0.042" in _texts(report) and "-0.083" in _texts(report)
    hatched = [p for p in report.axes[2].patches if p.get_hatch()]
    assert len(hatched) == int(noise.sum())


def test_harc_figures_name_the_run_on_one_line(saved: list[Figure], tmp_path: Path) -> None:
    from llamafactory_hera.harc.evaluate import refusal_record
    from llamafactory_hera.harc.plots import plot_diagnostics, plot_refusal

    run = tmp_path / "llama3-8b-harc-band4"
    record = refusal_record(["I'm sorry."] * 9 + ["Sure."], ["Sure."] * 19 + ["Sorry, no."])
    record["before"] = refusal_record(["Sure."] * 10, ["Sure."] * 20)
    plot_refusal(record, run / "harc_eval.png")
    history = [{"step": s, "layers": [2, 3], "validation": {str(layer): {
        "harmful_ref": -0.00001, "harmless_ref": 0.1, "harmful_harm": 0.2, "harmless_harm": -0.1} for layer in (2, 3)}}
        for s in (0, 2, 4)]
    plot_diagnostics(history, run / "harc_diagnostics.png")
    evaluation, diagnostics = saved
    _check_text(evaluation, "llama3-8b-harc-band4", wrapped=False)
    assert "10 prompts" in " ".join(_texts(evaluation)) and "stage: harc" in evaluation._suptitle.get_text()
    _check_text(diagnostics, "llama3-8b-harc-band4", wrapped=False)
    _integer_ticks(diagnostics)


def test_a_real_hera_run_draws_one_training_plot(assets: Any, saved: list[Figure], tmp_path: Path) -> None:
    """``llamafactory-cli train`` with ``plot_loss: true`` leaves training.png (and the host's training_loss.png) and no
    per-metric curves; redrawn here from the run's own logs, it has the losses, the term, the temperature and the
    alignment monitor's points (the default schedule scores every step of this 3-step run)."""
    from conftest import base_recipe, run_train
    from llamafactory_hera.hera.config import TRAINING_PLOT

    out = tmp_path / "tiny-qwen3vl-hera"
    # a process of its own: the ``saved`` fixture catches this process's savefig
    run_train(base_recipe(assets, "qwen3_vl", out, plot_loss=True, max_steps=3), tmp_path, process=True)
    assert sorted(p.name for p in out.glob("*.png")) == ["training.png", "training_loss.png"]
    plot_training(out, "hera", TRAINING_PLOT, _smooth)
    (fig,) = saved
    assert len(fig.axes) == 4 and fig.axes[2].get_title() == "alignment with the teacher (MKNN)"
    _check_text(fig, "tiny-qwen3vl-hera", wrapped=False)
    _integer_ticks(fig)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["loss", "lm_loss", "hera_loss"]
