"""HARC's trade-off as a table and a plot, when the jailbreak task ran (docs/eval.md, "Trade-off")."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from llamafactory_hera.evaluation.presets import DEMO_TEXT_TASK, JAILBREAK, PRESETS, REFUSAL_TASK
from llamafactory_hera.plots.text import save_png

ROBUSTNESS = "Robustness"
USABILITY = "Usability"
CAPABILITY = "Capability"
AXES = (ROBUSTNESS, USABILITY, CAPABILITY)
PLOT_SUFFIX = "_tradeoff.png"
MAIN_METRICS = ("acc_norm", "acc")  # a capability task's main score: the first found
OVER_REFUSAL = "over-refusal (pseudo-harmful)"
DEMO_STAND_IN = "demo (offline stand-in)"


def _row(axis: str, measure: str, source: dict[str, Any]) -> dict[str, Any]:
    return {
        "axis": axis,
        "measure": measure,
        "task": source["task"],
        "metric": source["metric"],
        "run": source["run"],
        "baseline": source["baseline"],
        "delta": source["delta"],
        "higher_is_better": source["higher_is_better"],
    }


def _main_scores(rows: list[dict[str, Any]], wanted: Any) -> list[dict[str, Any]]:
    by_task: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        if wanted(row):
            by_task.setdefault(row["task"], {})[row["metric"]] = row
    return [
        metrics[metric]
        for metrics in by_task.values()
        for metric in [next((m for m in MAIN_METRICS if m in metrics), None)]
        if metric
    ]


def _mean(values: list[float | None]) -> float | None:
    return None if not values or any(v is None for v in values) else round(sum(values) / len(values), 6)


def _capability(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str | None]:
    tasks = set(PRESETS["capability"].tasks)
    chosen = _main_scores(rows, lambda r: r["group"] == PRESETS["capability"].group and r["task"] in tasks)
    if chosen:
        found = [_row(CAPABILITY, f"{r['task']} {r['metric']}", r) for r in chosen]
        if len(chosen) > 1:
            run = _mean([r["run"] for r in chosen])
            base = _mean([r["baseline"] for r in chosen])
            found.append(
                {
                    "axis": CAPABILITY,
                    "measure": f"mean of {len(chosen)} tasks",
                    "task": "capability",
                    "metric": "mean",
                    "run": run,
                    "baseline": base,
                    "higher_is_better": True,
                    "delta": None if run is None or base is None else round(run - base, 6),
                }
            )
        return found, "capability"
    demo = _main_scores(rows, lambda r: r["task"] == DEMO_TEXT_TASK)
    return [_row(CAPABILITY, f"{DEMO_STAND_IN} {r['metric']}", r) for r in demo], "demo" if demo else None


def _transfer_beside_its_source(robustness: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The GCG transfer row gets the base's ``gcg_adaptive`` value: its suffixes were optimised on the base."""
    source = next((r for r in robustness if r["metric"] == "asr_gcg_adaptive"), None)
    base = source["baseline"] if source else None
    filled = []
    for row in robustness:
        if row["metric"] == "asr_gcg_transfer" and row["baseline"] is None and base is not None:
            row = {
                **row,
                "measure": f"{row['measure']} (base: its own suffixes)",
                "baseline": base,
                "delta": None if row["run"] is None else round(row["run"] - base, 6),
            }
        filled.append(row)
    return filled


def tradeoff(record: dict[str, Any]) -> dict[str, Any] | None:
    rows = record["rows"]
    robustness = [
        _row(
            ROBUSTNESS,
            f"ASR {r['metric'].removeprefix('asr_')}" + (f" [{r['scored_by']}]" if r.get("scored_by") else ""),
            r,
        )
        for r in rows
        if r["task"] == JAILBREAK and r["metric"].startswith("asr_") and ":" not in r["metric"]
    ]
    if not robustness:
        return None
    robustness = _transfer_beside_its_source(robustness)
    usability = [
        _row(USABILITY, OVER_REFUSAL, r)
        for r in rows
        if r["task"] == REFUSAL_TASK and r["metric"] == "refusal_rate_pseudo"
    ]
    capability, source = _capability(rows)
    not_measured = {}
    notes = []
    stage = record["run"]["stage"]
    if not usability:
        not_measured[USABILITY] = (
            f"a stage: {stage} run has no pseudo-harmful rows (over-refusal is measured on a HARC recipe's held-out "
            "pseudo-harmful rows)"
            if stage != "harc"
            else f"{REFUSAL_TASK} reported no refusal_rate_pseudo (see the failed tasks; rerun to retry)"
        )
    if source is None:
        not_measured[CAPABILITY] = "add capability (lm-eval, from the Hub) or demo (offline) to --tasks"
    elif source == "demo":
        notes.append(
            "capability: the capability preset did not run; the demo text task (8 offline questions) stands "
            "in for it, not a capability benchmark"
        )
    return {
        "rows": robustness + usability + capability,
        "not_measured": not_measured,
        "notes": notes,
        "capability": source,
    }


def cell(value: float | None, signed: bool = False) -> str:
    return "–" if value is None else (f"{value:+.4g}" if signed else f"{value:.4g}")


def _better(row: dict[str, Any], other: str) -> str:
    direction = "higher" if row["higher_is_better"] else "lower"
    if not row["delta"]:
        return direction + (" (even)" if row["delta"] == 0 else "")
    run_wins = (row["delta"] > 0) == row["higher_is_better"]
    return f"{direction} ({'run' if run_wins else other} better)"


def _title(record: dict[str, Any]) -> str:
    return "HARC trade-off" if record["run"]["stage"] == "harc" else "Jailbreak trade-off"


def markdown_lines(record: dict[str, Any]) -> list[str]:
    held = record["tradeoff"]
    baseline = record["baseline"]
    other = "base" if baseline and not baseline["trained"] else "baseline"
    lines = [
        f"{_title(record)}: {record['run']['title']}" + (f" vs {other} {baseline['title']}" if baseline else ""),
        "",
        f"| axis | measure | run | {other} | delta | better |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for axis in AXES:
        for row in (r for r in held["rows"] if r["axis"] == axis):
            lines.append(
                f"| {axis} | {row['measure']} | {cell(row['run'])} | {cell(row['baseline'])} | "
                f"{cell(row['delta'], signed=True)} | {_better(row, other)} |"
            )
        if axis in held["not_measured"]:
            measure = OVER_REFUSAL if axis == USABILITY else "capability"
            better = "lower" if axis == USABILITY else "higher"
            lines.append(f"| {axis} | {measure} | not measured | – | – | {better} |")
    lines.append("")
    lines += [f"- {axis.lower()} not measured: {why}" for axis, why in held["not_measured"].items()]
    lines += [f"- {note}" for note in held["notes"]]
    return lines


def plot(record: dict[str, Any], path: Path) -> None:
    # lazy: matplotlib, only for the plot
    from matplotlib.figure import Figure

    held = record["tradeoff"]
    baseline = record["baseline"]
    other = "base" if baseline and not baseline["trained"] else "baseline"
    titles = {
        ROBUSTNESS: "Robustness: ASR per attack\n(lower is better)",
        USABILITY: "Usability: over-refusal on pseudo-harmful\n(lower is better)",
        CAPABILITY: f"Capability{': ' + DEMO_STAND_IN if held['capability'] == 'demo' else ''}\n(higher is better)",
    }
    widths = [max(1, len([r for r in held["rows"] if r["axis"] == axis])) + 1 for axis in AXES]
    figure = Figure(figsize=(min(18, 3 + 1.1 * sum(widths)), 4.6))
    panels = figure.subplots(1, 3, gridspec_kw={"width_ratios": widths})
    for axis, panel in zip(AXES, panels, strict=True):
        rows = [r for r in held["rows"] if r["axis"] == axis]
        panel.set_title(titles[axis], fontsize=10)
        if not rows:
            why = held["not_measured"].get(axis, "")
            panel.text(
                0.5,
                0.5,
                "not measured:\n" + textwrap.fill(why, 28),
                ha="center",
                va="center",
                fontsize=8,
                transform=panel.transAxes,
                color="dimgray",
            )
            panel.set_xticks([])
            panel.set_yticks([])
            continue
        positions = list(range(len(rows)))
        sides = [("run", f"run: {record['run']['title']}", "tab:blue")]
        if baseline:
            sides.append(("baseline", f"{other}: {baseline['title']}", "tab:gray"))
        width = 0.8 / len(sides)
        for number, (key, label, color) in enumerate(sides):
            values = [r[key] if r[key] is not None else 0.0 for r in rows]
            bars = panel.bar(
                [p + (number - (len(sides) - 1) / 2) * width for p in positions],
                values,
                width,
                label=label,
                color=color,
            )
            panel.bar_label(bars, labels=[cell(r[key]) for r in rows], fontsize=7, padding=1)
        top = max([1.0, *[r[k] or 0.0 for r in rows for k in ("run", "baseline")]])
        panel.set_ylim(0, top * 1.15)
        panel.set_xticks(positions, [textwrap.fill(r["measure"], 14) for r in rows], fontsize=7)
    figure.suptitle(f"{_title(record)}: {record['run']['title']}" + (f" vs {other}" if baseline else ""), fontsize=11)
    figure.legend(*panels[0].get_legend_handles_labels(), loc="upper left", fontsize=8, frameon=False)  # off the bars
    figure.tight_layout(rect=(0, 0, 1, 0.92))
    save_png(figure, path, dpi=110)
