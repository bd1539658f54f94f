"""``llamafactory-hera eval`` (docs/eval.md). User errors are one line, raised before any model or library loads."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llamafactory_hera.evaluation.presets import (
    ALL_PRESETS,
    DEMO,
    DEMO_HOLDS,
    JAILBREAK,
    LM,
    LMMS,
    MODULES,
    PRESETS,
    check_task_setup,
    plan_tasks,
)
from llamafactory_hera.evaluation.runs import read_pair
from llamafactory_hera.evaluation.table2 import RAH_TABLE1, TABLE2
from llamafactory_hera.evaluation.tradeoff import cell
from llamafactory_hera.evaluation.tradeoff import markdown_lines as tradeoff_lines
from llamafactory_hera.runtime.errors import RecipeError
from llamafactory_hera.runtime.log import say

EXTRA = "pip install 'llamafactory-hera[eval]'"
# = pyproject's eval extra (tests/test_eval_cli.py); filelock < 4: lmms-eval 0.7.3 imports filelock._api
EXTRA_PACKAGES = ("lmms-eval==0.7.3", "lm-eval==0.4.13", "filelock>=3.16,<4")
SCORER_PACKAGES = ("nltk>=3.9", "spacy>=3.8")  # the extra's rest: CHAIR's, AMBER's scorers


def add_verbs(commands: Any) -> dict[str, Callable[[argparse.Namespace], None]]:
    presets = "; ".join(f"{name} ({p.holds})" for name, p in PRESETS.items())
    verb = commands.add_parser(
        "eval",
        help="Evaluate a run against its baseline (lmms-eval for MLLMs, lm-eval for text models).",
        description="Load the run's model as LLaMA-Factory loads it (base + adapter, or the full run) and its "
        "baseline, run the tasks through lmms-eval (MLLMs) or lm-eval (text models), and write one report per "
        "comparison into RUN_DIR (eval_report_vs_base.*, eval_report_vs_<baseline folder>.*, or eval_report.* for the "
        "run alone: .json, .md, .png). Finished tasks are cached in RUN_DIR/eval_cache: a rerun "
        f"skips them. Needs the eval extra: {EXTRA}.",
    )
    verb.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="output_dir of a finished run (any stage)")
    against = verb.add_mutually_exclusive_group()
    against.add_argument(
        "--baseline",
        type=Path,
        default=None,
        metavar="OTHER_RUN_DIR",
        help="the run to compare with (e.g. the hera_lambda: 0 twin or a plain sft run)",
    )
    against.add_argument("--base", action="store_true", help="compare with the run's base model (without the run)")
    verb.add_argument(
        "--tasks",
        required=True,
        metavar="PRESET_OR_TASKS",
        help=f"comma-separated presets or task names; presets: {presets}; {DEMO} ({DEMO_HOLDS})",
    )
    verb.add_argument(
        "--template",
        default=None,
        metavar="NAME",
        help="the recipe's template, for a run that recorded none (a plain stage: sft run of "
        "llamafactory-cli); a --baseline run without one takes RUN_DIR's; another value than the one "
        "RUN_DIR recorded is refused",
    )
    verb.add_argument("--limit", type=int, default=None, metavar="N", help="at most N examples per task (quick look)")
    verb.add_argument(
        "--batch-size",
        type=int,
        default=8,
        metavar="N",
        help="lm-eval batch size, and the jailbreak task's generation batch (default 8)",
    )
    verb.add_argument(
        "--attacks",
        default=None,
        metavar="ATTACKS",
        help="jailbreak task: comma-separated attacks of direct, prefilling, templates, gcg (default: "
        "direct,prefilling,templates; gcg optimises a suffix per prompt on each model)",
    )
    verb.add_argument(
        "--prompts",
        type=Path,
        default=None,
        metavar="FILE",
        help="jailbreak task: harmful prompts, a JSON list or JSONL (strings or objects with 'prompt'), "
        "AdvBench's harmful_behaviors.csv or HarmBench's behaviours CSV as downloaded; default: a HARC "
        "run's held-out harmful rows",
    )
    verb.add_argument(
        "--targets",
        type=Path,
        default=None,
        metavar="FILE",
        help="jailbreak task, with HarmBench's behaviours CSV: its GCG targets file "
        "(harmbench_targets_text.json, BehaviorID -> target)",
    )
    verb.add_argument(
        "--judge",
        default=None,
        metavar="MODEL",
        help="jailbreak task: score answers with a safety classifier (a checkpoint folder or Hugging "
        "Face id): a sequence-classification judge (e.g. GPTFuzz's) or a Llama Guard-style model; "
        "default: the refusal matcher",
    )
    verb.add_argument(
        "--gcg-steps",
        type=int,
        default=None,
        metavar="N",
        help="jailbreak task, gcg attack: optimisation steps per prompt and model (default 250)",
    )
    return {"eval": run_eval}


def require_library(library: str) -> None:
    if library not in MODULES:
        return
    try:
        importlib.import_module(MODULES[library])
    except ImportError as err:
        raise RecipeError(f"eval: {library} is not installed ({err}); install the eval extra: {EXTRA}") from err


def run_eval(args: argparse.Namespace) -> None:
    # LLaMA-Factory's and transformers' logging at warnings: progress bars stay readable
    os.environ.setdefault("LLAMAFACTORY_VERBOSITY", "WARN")

    if args.limit is not None and args.limit < 1:
        raise RecipeError(f"--limit: {args.limit}; give at least 1 (or leave it out for whole tasks)")
    if args.batch_size < 1:
        raise RecipeError(f"--batch-size: {args.batch_size}; give at least 1 (default 8)")
    run, baseline = read_pair(args.run_dir, args.baseline, args.base, args.template)
    names = [item.strip() for item in args.tasks.split(",") if item.strip()]
    library = LMMS if run.modality == "mllm" else LM
    plan_tasks(args.tasks, run.modality, run.stage, None)  # preset errors before library imports
    jailbreak = _jailbreak_setup(args, run.stage)
    needs_registry = any(name not in ALL_PRESETS for name in names)  # the presets' names are known (tested)
    require_library(library)
    known = None
    if needs_registry:
        # lazy: the eval extra's registries
        from llamafactory_hera.evaluation.libraries import known_tasks

        known = known_tasks(library)
    tasks = plan_tasks(args.tasks, run.modality, run.stage, known)
    for task in tasks:
        require_library(task.library)
    from llamafactory_hera.evaluation.runner import cached_result  # lazy: after the cheap checks

    def cached(task: Any) -> bool:  # cached for every model: no dataset needed
        return all(cached_result(args.run_dir, spec, task, args.limit) is not None for spec in (run, baseline) if spec)

    check_task_setup(tasks, cached)
    _evaluate(args, run, baseline, tasks, jailbreak)


def _jailbreak_setup(args: argparse.Namespace, stage: str) -> Any:
    # lazy: only for eval (every verb's parser imports this module)
    from llamafactory_hera.evaluation.jailbreak import DEFAULT_ATTACKS, setup_from_args

    wanted = JAILBREAK in [item.strip() for item in args.tasks.split(",")]
    given = [
        name
        for name, value in (
            ("--attacks", args.attacks),
            ("--prompts", args.prompts),
            ("--judge", args.judge),
            ("--gcg-steps", args.gcg_steps),
            ("--targets", args.targets),
        )
        if value is not None
    ]
    if not wanted:
        if given:
            raise RecipeError(f"{', '.join(given)}: options of the jailbreak task; add jailbreak to --tasks")
        return None
    setup = setup_from_args(
        args.attacks or ",".join(DEFAULT_ATTACKS), args.prompts, args.judge, args.gcg_steps, args.targets
    )
    if not setup.prompts and stage != "harc":
        raise RecipeError(
            f"--tasks jailbreak: this run's stage is '{stage}'; give --prompts FILE (a JSON list or "
            "JSONL of harmful prompts), or evaluate a stage: harc run (its held-out harmful rows)"
        )
    return setup


def _with_transfer(setup: Any, baseline: Any) -> Any:
    if baseline is None:
        return setup
    answers = (baseline.results.get(JAILBREAK) or {}).get("answers", [])
    transfer = tuple((a["prompt"], a["suffix"]) for a in answers if a["attack"] == "gcg_adaptive")
    if not transfer:
        say(
            f"eval: the {baseline.spec.label} found no GCG suffix (its jailbreak task failed), so the run gets "
            "gcg_adaptive only, no gcg_transfer"
        )
    return dataclasses.replace(setup, transfer=transfer)


def _evaluate(args: argparse.Namespace, run: Any, baseline: Any, tasks: list[Any], jailbreak: Any = None) -> None:
    # lazy: torch, after the cheap checks
    from llamafactory_hera.evaluation.report import table2_lines, write_reports
    from llamafactory_hera.evaluation.runner import evaluate_model

    names = ", ".join(t.name for t in tasks)
    say(
        f"eval: {len(tasks)} task{'s' if len(tasks) != 1 else ''} ({names}) on {run.title}"
        + (f" against {baseline.title}" if baseline else "")
    )
    for spec in (run, baseline):
        if spec is not None and spec.inherited:
            say(
                f"eval: {spec.label} {spec.run_dir} recorded no {', '.join(spec.inherited)}; loading it with "
                + ", ".join(f"{k}: {v}" for k, v in spec.inherited.items())
                + (" (the other model's)" if baseline is not None else " (--template)")
            )
    rows_from = run  # the refusal task reads the run's held-out rows for both models

    def evaluate(spec: Any, setup: Any) -> Any:
        return evaluate_model(spec, rows_from, tasks, args.run_dir, args.limit, args.batch_size, say, setup)

    transfers = jailbreak is not None and "gcg" in jailbreak.attacks and baseline is not None
    other = evaluate(baseline, jailbreak) if transfers else None  # first: its GCG suffixes go to the run
    mine = evaluate(run, _with_transfer(jailbreak, other))
    if baseline is not None and other is None:
        other = evaluate(baseline, jailbreak)
    record = write_reports(args.run_dir, args.tasks, tasks, mine, other, args.limit)
    for row in record["rows"]:
        delta = "" if row["delta"] is None else f" ({row['delta']:+.4g})"
        base = "" if row["baseline"] is None else f" vs {row['baseline']:.4g}"
        scorer = f"  [scored by {row['scored_by']}]" if row.get("scored_by") else ""
        print(f"  {row['group']:<14} {row['task']:<32} {row['metric']:<24} {cell(row['run'])}{base}{delta}{scorer}")
    for paper_table in (TABLE2, RAH_TABLE1):
        if record[paper_table.key]:
            print("\n".join(["", *table2_lines(record, paper_table)]))
    if record["tradeoff"]:
        print("\n".join(["", *tradeoff_lines(record)]))
    old = record["replaces"]
    if old:
        say(
            f"eval: replaced {old['file']} and its .md / .png (of {old.get('created')}, tasks {old.get('tasks_spec')}, "
            f"against {old.get('baseline') or 'nothing'})"
        )
    say("eval: evaluated in " + "; ".join(f"{o.spec.label}: {o.precision}" for o in (mine, other) if o is not None))
    say(f"eval: {', '.join(record['files'])} in {args.run_dir}")
    failed = {
        f"{o.spec.label}/{task}": line for o in (mine, other) if o is not None for task, line in o.failures.items()
    }
    if failed:
        first = next(iter(failed.items()))
        raise RecipeError(
            f"eval: {len(failed)} task run(s) failed ({', '.join(failed)}; first: {first[0]}: "
            f"{first[1]}); finished tasks are kept in {args.run_dir / 'eval_cache'} and reported; rerun "
            "to retry the rest"
        )
