"""``eval_report*.json``, ``.md`` and ``.png`` (docs/eval.md, "Outputs"), one per comparison."""

from __future__ import annotations

import hashlib
import json
import re
import textwrap
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from llamafactory_hera.evaluation.presets import JAILBREAK, PRESETS, PlannedTask
from llamafactory_hera.evaluation.protocols import MARK
from llamafactory_hera.evaluation.runner import Outcome, _describe
from llamafactory_hera.evaluation.table2 import RAH_TABLE1, TABLE2, PaperTable, markdown_lines, table2
from llamafactory_hera.evaluation.tradeoff import PLOT_SUFFIX, cell, plot, tradeoff
from llamafactory_hera.evaluation.tradeoff import markdown_lines as tradeoff_lines
from llamafactory_hera.plots.text import save_png

REPORT_STEM = "eval_report"
SUFFIXES = (".json", ".md", ".png")
GROUP_ORDER = (*dict.fromkeys(p.group for p in PRESETS.values()), "Demo", "Other")  # presets' order
JAILBREAK_SUFFIX = "_jailbreak.jsonl"


def report_rows(tasks: list[PlannedTask], run: Outcome, baseline: Outcome | None) -> list[dict[str, Any]]:
    rows = []
    for task in sorted(tasks, key=lambda t: GROUP_ORDER.index(t.group) if t.group in GROUP_ORDER else 99):
        mine = {(e["task"], e["metric"]): e for e in run.results.get(task.name, {}).get("entries", [])}
        theirs = (
            {(e["task"], e["metric"]): e for e in baseline.results.get(task.name, {}).get("entries", [])}
            if baseline
            else {}
        )
        for key in list(dict.fromkeys([*mine, *theirs])):
            entry = mine.get(key) or theirs[key]
            value = (mine.get(key) or {}).get("value")
            other = (theirs.get(key) or {}).get("value")
            delta = None if value is None or other is None else round(value - other, 6)
            scorers = dict.fromkeys(
                s for s in ((mine.get(key) or {}).get("scored_by"), (theirs.get(key) or {}).get("scored_by")) if s
            )  # jailbreak's
            rows.append(
                {
                    "group": task.group,
                    "task": key[0],
                    "metric": key[1],
                    "run": value,
                    "baseline": other,
                    "delta": delta,
                    "higher_is_better": entry.get("higher_is_better", True),
                    "library": run.results.get(task.name, {}).get("library", task.library),
                }
                | ({"scored_by": " / ".join(scorers)} if scorers else {})
            )
    return rows


def _markdown(record: dict[str, Any]) -> str:
    lines = [
        f"# Evaluation of {record['run']['title']}",
        "",
        f"- run: `{record['run']['model']}` (stage {record['run']['stage']}; {record['run']['precision']})",
    ]
    if record["baseline"]:
        lines.append(
            f"- baseline: `{record['baseline']['model']}` ({record['baseline']['title']}; "
            f"{record['baseline']['precision']})"
        )
    for side in ("run", "baseline"):
        taken = (record[side] or {}).get("inherited")
        if taken:
            lines.append(
                f"- {side} recorded no {', '.join(taken)}: loaded with "
                + ", ".join(f"{k}: {v}" for k, v in taken.items())
                + " (the other model's, or --template)"
            )
    lines += [
        f"- tasks: {record['tasks_spec']}"
        + (f" (limit {record['limit']} examples per task)" if record["limit"] else "")
    ]
    if record.get("jailbreak"):
        settings = record["jailbreak"]["settings"]
        both = len({json.dumps(s, sort_keys=True) for s in settings.values()}) == 1
        for side, held in list(settings.items())[:1] if both else settings.items():
            lines.append(
                f"- jailbreak{'' if both else f' ({side})'}: " + "; ".join(f"{k}: {v}" for k, v in held.items())
            )
        lines.append(
            f"- jailbreak answers, one per line (attack, template, prompt, answer, refused, success): "
            f"`{record['jailbreak']['answers_file']}`"
        )
    lines.append("")
    for paper_table in (TABLE2, RAH_TABLE1):
        if record.get(paper_table.key):
            title, *table = table2_lines(record, paper_table)
            lines += [f"## {title}", *table, ""]
    if record.get("tradeoff"):
        title, *table = tradeoff_lines(record)
        lines += [f"## {title}", *table, f"- plot: `{record['tradeoff']['plot']}`", ""]
    for group in dict.fromkeys(row["group"] for row in record["rows"]):
        lines += [f"## {group}", "", "| task | metric | run | baseline | delta |", "| --- | --- | ---: | ---: | ---: |"]
        for row in (r for r in record["rows"] if r["group"] == group):
            notes = ([] if row["higher_is_better"] else ["lower is better"]) + (
                [f"scored by {row['scored_by']}"] if row.get("scored_by") else []
            )
            arrow = f" ({'; '.join(notes)})" if notes else ""
            lines.append(
                f"| {row['task']} | {row['metric']}{arrow} | {cell(row['run'])} | {cell(row['baseline'])} "
                f"| {cell(row['delta'], signed=True)} |"
            )
        lines.append("")
    if record["failed"]:
        lines += ["## Failed (rerun to retry; finished tasks are cached)", ""]
        lines += [
            f"- {who}: {task}: {line}" for who, failed in record["failed"].items() for task, line in failed.items()
        ]
    return "\n".join(lines) + "\n"


def table2_lines(record: dict[str, Any], paper_table: PaperTable = TABLE2) -> list[str]:
    return markdown_lines(
        record[paper_table.key], record["run"]["title"], (record["baseline"] or {}).get("title"), paper_table
    )


def _plot(record: dict[str, Any], path: Path) -> None:
    # lazy: matplotlib, only for the plot
    from matplotlib.figure import Figure

    rows = [r for r in record["rows"] if r["run"] is not None or r["baseline"] is not None]
    marked = _marked_metrics(record)
    height = max(2.5, 0.45 * len(rows) + 1.2 + 0.3 * bool(marked))
    figure = Figure(figsize=(9, height))
    axes = figure.subplots()
    labels = [
        f"{r['group']}: {r['task']} / {r['metric']}"
        + (f" {MARK}" if (r["task"], r["metric"]) in marked else "")
        + (f"\n[{r['scored_by']}]" if r.get("scored_by") else "")
        for r in rows
    ]  # own line: a judge's path is long
    positions = list(range(len(rows)))
    run_values = [r["run"] or 0.0 for r in rows]
    axes.barh(
        [p + 0.2 for p in positions], run_values, height=0.4, label=f"run: {record['run']['title']}", color="tab:blue"
    )
    if record["baseline"]:
        axes.barh(
            [p - 0.2 for p in positions],
            [r["baseline"] or 0.0 for r in rows],
            height=0.4,
            label=f"baseline: {record['baseline']['title']}",
            color="tab:gray",
        )
    for position, row in zip(positions, rows, strict=True):
        if row["delta"] is not None:
            good = (row["delta"] >= 0) == bool(row["higher_is_better"])
            axes.annotate(
                f"{row['delta']:+.3g}",
                (max(row["run"] or 0, row["baseline"] or 0), position),
                xytext=(4, 0),
                textcoords="offset points",
                va="center",
                fontsize=8,
                color="tab:green" if good else "tab:red",
            )
    top = max([0.0, *run_values, *[r["baseline"] or 0.0 for r in rows]])
    axes.set_xlim(0, top * 1.15 if top > 0 else 1.0)  # room for the deltas
    axes.set_yticks(positions, labels, fontsize=8)
    axes.invert_yaxis()
    axes.set_xlabel("score (as the task reports it)")
    axes.set_title(f"llamafactory-hera eval: {record['run']['title']}", fontsize=10)
    axes.legend(fontsize=8, loc="lower right")
    shown = [
        f"{task} / {metric}: {', '.join(columns)}"
        for (task, metric), columns in marked.items()
        if (task, metric) in {(r["task"], r["metric"]) for r in rows}
    ]
    note = (
        textwrap.fill(
            f"{MARK} computed otherwise than the paper's column ({'; '.join(shown)}); how: the .md report's notes",
            width=150,
        )
        if shown
        else ""
    )
    if note:
        figure.text(0.01, 0.01, note, fontsize=7, va="bottom")
    figure.tight_layout(rect=(0, (0.02 + 0.14 * note.count("\n")) / height + 0.01 if note else 0, 1, 1))
    save_png(figure, path, dpi=110)


def _marked_metrics(record: dict[str, Any]) -> dict[tuple[str, str], list[str]]:
    """(task, metric) computed otherwise than the paper -> the columns it heads."""
    found = {}
    for paper_table in (TABLE2, RAH_TABLE1):
        layout = record.get(paper_table.key)
        for column in (layout or {}).get("marked", {}):
            for protocol in paper_table.protocols[column]:
                if protocol.differs:
                    found.setdefault((protocol.task, protocol.metric), []).append(f"{paper_table.title} {column}")
    return found


def report_stem(baseline: Any, run_dir: Path | None = None) -> str:
    """A baseline named ``base``, or like another whose report ``run_dir`` holds, adds its path's hash."""
    if baseline is None:
        return REPORT_STEM
    if not baseline.trained:
        return f"{REPORT_STEM}_vs_base"
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", baseline.run_dir.name) or "baseline"
    stem = f"{REPORT_STEM}_vs_{name}"
    held = (_replaced(run_dir / f"{stem}.json") or {}) if run_dir is not None else {}
    if name == "base" or held.get("baseline") not in (None, str(baseline.run_dir)):  # the plain name is --base's
        stem += "_" + hashlib.sha1(str(baseline.run_dir).encode()).hexdigest()[:6]
    return stem


def _replaced(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {"file": path.name}
    against = (old.get("baseline") or {}).get("run_dir")
    return {
        "file": path.name,
        "created": old.get("created"),
        "tasks_spec": old.get("tasks_spec"),
        "baseline": ("base" if not (old.get("baseline") or {}).get("trained", True) else against),
    }


def _write_jailbreak_answers(path: Path, run: Outcome, baseline: Outcome | None) -> dict[str, Any] | None:
    """Per model its ``answers_file`` and ``settings``; None when the task did not run."""
    lines = []
    settings = {}
    for outcome in (run, baseline):
        result = outcome.results.get(JAILBREAK) if outcome is not None else None
        if not result:
            continue
        settings[outcome.spec.label] = result.get("settings", {})
        lines += [
            json.dumps({"model": outcome.spec.label, "title": outcome.spec.title, **answer}, ensure_ascii=False)
            for answer in result.get("answers", [])
        ]
    if not settings:
        path.unlink(missing_ok=True)  # the replaced report's
        return None
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return {"answers_file": path.name, "settings": settings}


def write_reports(
    run_dir: Path, tasks_spec: str, tasks: list[PlannedTask], run: Outcome, baseline: Outcome | None, limit: int | None
) -> dict[str, Any]:
    def who(outcome: Outcome | None) -> dict[str, Any] | None:
        if outcome is None:
            return None
        spec = outcome.spec
        return {
            "title": spec.title,
            "run_dir": str(spec.run_dir),
            "stage": spec.stage,
            "model": _describe(spec),
            "precision": outcome.precision,
            "trained": spec.trained,
            "cached_tasks": outcome.cached,
            "loading": {
                k: v for k, v in spec.recipe.items() if k not in ("model_name_or_path", "adapter_name_or_path")
            },
            "inherited": spec.inherited,
            "seconds": {name: r.get("seconds") for name, r in outcome.results.items()},
        }

    stem = report_stem(baseline.spec if baseline is not None else None, run_dir)
    files = [stem + suffix for suffix in SUFFIXES]
    record = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "tasks_spec": tasks_spec,
        "limit": limit,
        "run": who(run),
        "baseline": who(baseline),
        "rows": report_rows(tasks, run, baseline),
        "failed": {o.spec.label: o.failures for o in (run, baseline) if o is not None and o.failures},
        "files": files,
        "replaces": _replaced(run_dir / files[0]),
    }
    for paper_table in (TABLE2, RAH_TABLE1):
        record[paper_table.key] = table2(record, paper_table)
    record["jailbreak"] = _write_jailbreak_answers(run_dir / f"{stem}{JAILBREAK_SUFFIX}", run, baseline)
    if record["jailbreak"]:
        files.append(record["jailbreak"]["answers_file"])
    record["tradeoff"] = tradeoff(record)
    tradeoff_plot = run_dir / f"{stem}{PLOT_SUFFIX}"
    if record["tradeoff"]:
        record["tradeoff"]["plot"] = tradeoff_plot.name
        files.append(tradeoff_plot.name)
        plot(record, tradeoff_plot)
    else:
        tradeoff_plot.unlink(missing_ok=True)  # the replaced report's
    (run_dir / files[0]).write_text(json.dumps(record, indent=2), encoding="utf-8")
    (run_dir / files[1]).write_text(_markdown(record), encoding="utf-8")
    _plot(record, run_dir / files[2])
    return record
