"""``llamafactory-hera select --report RUN_DIR``: every head's MKNN before and after a HeRA run, on the same pairs
and teacher features, marked when within noise (:mod:`.noise`).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np

from llamafactory_hera.heads.geometry import head_names
from llamafactory_hera.hera.config import HERA_RUN_RECORD as RUN_RECORD
from llamafactory_hera.hera.config import parse_hera_arguments
from llamafactory_hera.hera.selection.noise import (
    MIN_RESAMPLES,
    RESAMPLES,
    HeadChange,
    paired_bootstrap,
    within_noise,
)
from llamafactory_hera.hera.selection.recipe_write import write_text_atomic
from llamafactory_hera.hera.selection.select import SelectionOptions, prepare, score_head_neighbours, scoring_dtype
from llamafactory_hera.plots.heads import format_head_table, plot_before_after
from llamafactory_hera.plots.text import signed_number
from llamafactory_hera.recipe.dataset_info import as_names
from llamafactory_hera.runtime.errors import RecipeError
from llamafactory_hera.runtime.log import host_output_to, show
from llamafactory_hera_patches.tools.model_data import parse_recipe

PRECISION = ("bf16", "fp16", "pure_bf16")  # precision keys in hera_run.json: the scoring dtype
REPORT_JSON = "hera_report.json"
REPORT_PNG = "hera_report.png"
REPORT_LOG = "hera_report.log"  # the host's output while scoring
TABLE_COLUMNS = ["head", "before", "after", "delta", "ci", "change"]


def _run_recipe(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    path = run_dir / RUN_RECORD
    if not path.is_file():
        raise FileNotFoundError(f"--report: {run_dir} has no {RUN_RECORD}; give the output_dir of a stage: hera run")
    record = json.loads(path.read_text(encoding="utf-8"))
    host = record.get("host")
    if not host:
        raise RecipeError(f"--report: {path} predates run reports (no 'host' section); re-run training to report")
    recipe = {k: v for k, v in host.items() if k not in {"seed", "output_dir", *PRECISION} and v is not None}
    if "adapter_name_or_path" in recipe:  # LLaMA-Factory parses a comma-separated string
        recipe["adapter_name_or_path"] = ",".join(as_names(recipe["adapter_name_or_path"]))
    recipe["stage"] = "sft"
    return recipe, record


def _trained_recipe(recipe: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    trained = copy.deepcopy(recipe)
    if recipe.get("finetuning_type", "lora") == "lora":
        if not (run_dir / "adapter_config.json").is_file():
            raise FileNotFoundError(f"--report: {run_dir} has no adapter_config.json (did training finish?)")
        adapters = recipe.get("adapter_name_or_path") or []
        trained["adapter_name_or_path"] = ",".join([*as_names(adapters), str(run_dir)])
    else:
        if not (run_dir / "config.json").is_file():
            raise FileNotFoundError(f"--report: {run_dir} has no config.json (did training finish?)")
        trained["model_name_or_path"] = str(run_dir)
        trained.pop("adapter_name_or_path", None)
    return trained


def _row(head: str, before: Any, after: Any, delta: float, low: float, high: float, noise: bool) -> dict[str, Any]:
    return {
        "head": head,
        "before": before,
        "after": after,
        "delta": delta,
        "ci_low": low,
        "ci_high": high,
        "ci": f"[{signed_number(low, 4)}, {signed_number(high, 4)}]",
        "within_noise": noise,
        "change": "within noise" if noise else "beyond noise",
    }


def summary_rows(change: HeadChange, selected: list[tuple[int, int]]) -> list[dict[str, Any]]:
    """Per aligned head: before, after, delta, interval, noise mark; then the other heads' mean (interval over the
    same resamples) and the other head that dropped most."""
    delta = change.delta

    def head_row(name: str, layer: int, head: int) -> dict[str, Any]:
        return _row(
            name,
            float(change.before[layer, head]),
            float(change.after[layer, head]),
            float(delta[layer, head]),
            float(change.low[layer, head]),
            float(change.high[layer, head]),
            bool(change.noise[layer, head]),
        )

    rows = [head_row(f"L{layer}H{head}", layer, head) for layer, head in selected]
    others = np.ones_like(delta, dtype=bool)
    for layer, head in selected:
        others[layer, head] = False
    if others.any():
        mean = float(delta[others].mean())
        tail = (1.0 - change.settings["confidence"]) / 2
        low, high = (
            np.quantile(change.deltas[:, others].mean(-1), [tail, 1.0 - tail])
            if len(change.deltas)
            else (np.nan, np.nan)
        )
        noise = bool(within_noise(mean, low, high, change.resolution))
        rows.append(
            _row(
                f"others ({int(others.sum())}) mean",
                float(change.before[others].mean()),
                float(change.after[others].mean()),
                mean,
                float(low),
                float(high),
                noise,
            )
        )
        layer, head = np.unravel_index(int(np.argmin(np.where(others, delta, np.inf))), delta.shape)
        rows.append(head_row(f"others: largest drop L{layer}H{head}", layer, head))
    return rows


def change_note(change: HeadChange, num_pairs: int, k: int) -> str:
    """The lines under the table: resolution and interval."""
    settings = change.settings
    percent = f"{100 * settings['confidence']:g}%"
    return (
        f"resolution: 1/({num_pairs} pairs x k={k}) = {change.resolution:.4f} (the smallest step a score moves)\n"
        f"ci: {percent} paired bootstrap interval of delta, {settings['resamples']} resamples of the {num_pairs} "
        f"pairs (seed {settings['seed']}); within noise: the interval contains 0 or |delta| < resolution\n"
        f"{int(change.noise.sum())} of {change.noise.size} heads changed within noise"
    )


def report_fields(change: HeadChange) -> dict[str, Any]:
    """The report's change fields (``[L][H]`` lists)."""
    return {
        "delta": change.delta.tolist(),
        "delta_ci_low": change.low.tolist(),
        "delta_ci_high": change.high.tolist(),
        "within_noise": change.noise.tolist(),
        "resolution": change.resolution,
        "bootstrap": change.settings,
    }


def run_report(args: Any) -> dict[str, Any]:
    """Score before and after training on the same pairs; write the report."""
    resamples = getattr(args, "bootstrap", RESAMPLES)
    if resamples < MIN_RESAMPLES:
        raise RecipeError(
            f"--bootstrap: {resamples}; give at least {MIN_RESAMPLES} resamples (an interval from fewer "
            f"is noise itself), or leave it out for {RESAMPLES}"
        )
    run_dir: Path = args.report
    recipe, record = _run_recipe(run_dir)
    hera = parse_hera_arguments({k: v for k, v in record.items() if k.startswith("hera_")})
    seed = args.seed if args.seed is not None else int(record["host"].get("seed") or 0) + 1
    options = SelectionOptions.from_keys(
        hera, args, seed=seed, device=args.device, dtype=getattr(args, "dtype", None) or scoring_dtype(record["host"])
    )
    if options.dataset is None:
        show("note: scoring on the run's training data; pass --dataset NAME for held-out pairs")
    with host_output_to(None if getattr(args, "verbose", False) else run_dir / REPORT_LOG):
        base_args = parse_recipe(recipe)
        pairs, identity = prepare(base_args, options)
        before = score_head_neighbours(base_args, options, pairs)
        after = score_head_neighbours(parse_recipe(_trained_recipe(recipe, run_dir)), options, pairs)
        change = paired_bootstrap(before, after, options.k, seed, resamples=resamples)
        selected = [(ref.layer, ref.head) for ref in hera.hera_heads]
        rows = summary_rows(change, selected)
        show(format_head_table(rows, TABLE_COLUMNS))
        show(change_note(change, len(pairs), options.k))
        report = {
            "run_dir": str(run_dir),
            "heads": head_names(hera.hera_heads),
            "before": change.before.tolist(),
            "after": change.after.tolist(),
            **report_fields(change),
            "summary": rows,
            "num_pairs": len(pairs),
            "identity": identity,
            "settings": {
                "num_samples": options.num_samples,
                "num_samples_used": len(pairs),
                "k": options.k,
                "mode": options.mode,
                "seed": seed,
                "clamp": options.clamp,
                "dtype": options.dtype,
            },
        }
        write_text_atomic(run_dir / REPORT_JSON, json.dumps(report, indent=2) + "\n")
        percent = f"{100 * change.settings['confidence']:g}%"
        plot_before_after(
            change.before,
            change.after,
            selected,
            run_dir / REPORT_PNG,
            f"{run_dir.name} (stage: hera): MKNN per head before/after training ({options.mode}, "
            f"{len(pairs)} pairs, k={options.k})",
            box_label="aligned heads (hera_heads)",
            noise=change.noise,
            noise_label=f"within noise: the {percent} bootstrap interval of the "
            f"difference contains 0, or it is under one step ({change.resolution:.4f})",
        )
        show(f"report: {run_dir / REPORT_JSON}\nplot: {run_dir / REPORT_PNG}")
    return report
