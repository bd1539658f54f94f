"""Every PNG the plugin writes keeps its labels inside the canvas: no ink on the outer border (a clipped tick label
or title touches the edge). Checked on the pixels of the saved files, for the training curves and both heatmaps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llamafactory_hera.hera.config import TRAINING_PLOT
from llamafactory_hera.plots.heads import plot_before_after, plot_head_heatmap
from llamafactory_hera.plots.training import plot_training

LONG_TITLE = ("MKNN alignment of every head of /data/checkpoints/qwen3-vl-8b-instruct/merged on 1000 image-caption "
              "pairs of llava_665k_subset (text mode, k = 10)")


def _host_smooth(values: list[float]) -> list[float]:
    """LLaMA-Factory's smoothing, imported where the patch takes it from."""
    from llamafactory.extras.ploting import smooth

    return smooth(values)


def _ink_on_border(path: Path, border: int = 2) -> list[str]:
    """Which edges of the image hold a pixel that is not the (white) background."""
    pixels = np.asarray(Image.open(path).convert("L"), dtype=np.int16)
    edges = {"left": pixels[:, :border], "right": pixels[:, -border:],
             "top": pixels[:border], "bottom": pixels[-border:]}
    return [name for name, strip in edges.items() if (strip < 250).any()]


def test_training_plot_fits_its_canvas(tmp_path: Path) -> None:
    run = tmp_path / "saves" / "qwen3-vl-8b-instruct-lora-hera-lambda0.01-k10-five-heads-learned-temperature"
    run.mkdir(parents=True)
    taus = [0.07 + 0.0000137 * step for step in range(1, 21)]  # moves in its 4th significant digit, as in the demo
    history = [{"step": s, "loss": 6.3 - 0.01 * s, "lm_loss": 6.2 - 0.01 * s, "hera_loss": 1.9 - 0.02 * s,
                "hera_temperature": t} for s, t in zip(range(1, 21), taus, strict=True)]
    (run / "trainer_state.json").write_text(json.dumps({"log_history": history}), encoding="utf-8")
    path, missing = plot_training(run, "hera", TRAINING_PLOT, _host_smooth)
    assert path.name == "training.png" and missing == []
    assert _ink_on_border(path) == []


@pytest.mark.parametrize("layers,heads", [(2, 4), (36, 32)])
def test_selection_heatmaps_fit_their_canvas(tmp_path: Path, layers: int, heads: int) -> None:
    rng = np.random.default_rng(0)
    scores = rng.uniform(0.0, 0.3, size=(layers, heads))
    chosen = [(layers - 1, 0), (0, heads - 1)]
    heatmap = plot_head_heatmap(scores, chosen, tmp_path / "heatmap.png", LONG_TITLE)
    report = plot_before_after(scores, scores + rng.normal(0, 0.01, size=scores.shape), chosen,
                               tmp_path / "report.png", LONG_TITLE)
    assert _ink_on_border(heatmap) == [] and _ink_on_border(report) == []
