"""HARC's figures: ``harc_eval.png`` (refusal rates, base vs trained) and ``harc_diagnostics.png``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llamafactory_hera.plots.text import agg_figure, fit_title, save_png
from llamafactory_hera.plots.training import integer_steps

_GROUPS = (("harmful", "held-out harmful\n(higher: safer)"), ("pseudo", "pseudo-harmful\n(lower: less over-refusal)"))
_BEFORE_COLOR = "#9e9e9e"
_AFTER_COLOR = "#1f77b4"
_LINES = (("harmful", "#d62728", "-"), ("harmless", "#2ca02c", "--"))


def plot_refusal(record: dict[str, Any], path: Path) -> Path:
    """Bar chart of a refusal record's rates, beside the base model's if ``record["before"]`` has them."""
    series = [("trained", record, _AFTER_COLOR)]
    before = record.get("before")
    if isinstance(before, dict) and all(f"refusal_rate_{group}" in before for group, _ in _GROUPS):
        series.insert(0, ("base (adapter disabled)", before, _BEFORE_COLOR))
    fig = agg_figure(figsize=(6.4, 4.4))
    ax = fig.subplots()
    width = 0.8 / len(series)
    for k, (name, rates, color) in enumerate(series):
        for g, (group, _) in enumerate(_GROUPS):
            x = g + (k - (len(series) - 1) / 2) * width
            value = rates.get(f"refusal_rate_{group}")
            ax.bar(x, 0.0 if value is None else value, width * 0.92, color=color, label=name if g == 0 else None)
            text = "n/a" if value is None else f"{100 * value:.0f}%"
            ax.annotate(
                text,
                (x, 0.0 if value is None else value),
                xytext=(0, 3),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=9,
            )
    counts = [(record.get(group) or {}).get("count", "?") for group, _ in _GROUPS]
    ax.set_xticks(
        range(len(_GROUPS)),
        [label.replace("\n", f" ({count} prompts)\n", 1) for (_, label), count in zip(_GROUPS, counts, strict=True)],
    )
    ax.set_ylim(0.0, 1.15)
    ax.set_yticks([0.0, 0.25, 0.5, 0.75, 1.0], ["0%", "25%", "50%", "75%", "100%"])
    ax.set_ylabel("refusal rate")
    ax.legend(loc="upper center", ncols=len(series), fontsize=9, frameon=False)
    ax.set_title("greedy answers; a refusal is found by a phrase matcher", fontsize=8)
    title = f"{Path(path).parent.name} (stage: harc): refusal rates"
    fit_title(fig, fig.suptitle(title, fontsize=10), title)
    return save_png(fig, path, dpi=120)


def _mean_cosines(entry: dict[str, Any]) -> dict[str, float] | None:
    validation = entry.get("validation") or {}
    layers = [str(layer) for layer in entry.get("layers") or []]
    values = [validation[layer] for layer in layers if layer in validation] or list(validation.values())
    if not values:
        return None
    return {
        key: sum(float(v[key]) for v in values) / len(values)
        for key in ("harmful_ref", "harmless_ref", "harmful_harm", "harmless_harm")
    }


def plot_diagnostics(history: list[dict[str, Any]], path: Path) -> Path:
    """Validation cosines per optimizer step, averaged over each ``HarcState.record`` entry's coupled layers."""
    points = [
        (int(entry["step"]), [int(x) for x in entry.get("layers") or []], means)
        for entry in history
        if (means := _mean_cosines(entry)) is not None
    ]
    if not points:
        raise ValueError("plot_diagnostics: the history has no entry with validation cosines (nothing to plot)")
    steps = [step for step, _, _ in points]
    changes: list[tuple[int, list[int]]] = []
    for step, layers, _ in points:
        if not changes or changes[-1][1] != layers:
            changes.append((step, layers))
    fig = agg_figure(figsize=(9.6, 4.4))
    axes = fig.subplots(1, 2, sharey=True)
    style = {"marker": "o", "markersize": 4} if len(points) <= 30 else {}
    for ax, key, name in zip(
        axes, ("ref", "harm"), ("prompt end t_post vs v_ref", "instruction t_inst vs v_harm"), strict=True
    ):
        for group, color, line in _LINES:
            means = [m[f"{group}_{key}"] for _, _, m in points]
            ax.plot(steps, means, color=color, linestyle=line, label=f"held-out {group}", **style)
        ax.axhline(0.0, color="black", linewidth=0.6)
        for step, _ in changes[1:]:
            ax.axvline(step, color="#7f7f7f", linestyle=":", linewidth=0.8)
        integer_steps(ax, steps, "optimizer step")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean cosine over the coupled layers")
    axes[0].legend(fontsize=8)
    footer = "coupled layers: " + "; ".join(f"step {step}: L{','.join(map(str, layers))}" for step, layers in changes)
    fit_title(fig, fig.supxlabel(footer, fontsize=9), footer)
    title = f"{Path(path).parent.name} (stage: harc): held-out prompts' residuals against the directions"
    fit_title(fig, fig.suptitle(title, fontsize=10), title)
    return save_png(fig, path, dpi=120)
