"""HARC's demo (``--method harc``): safety fine-tuning of a tiny Llama-3 on tiny copies of the public sources, then
the base and trained models' refusal rates.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from llamafactory_hera.demo.folders import LOG_NAME, RECIPE_NAME, RUN_DIR_NAME
from llamafactory_hera.demo.runner import DemoContext, demo_recipe, prepare_assets, say, train_and_report
from llamafactory_hera.demo.summary import chat_command, command, eval_base_lines, summary_text

TITLE = "HARC"
FAMILIES = ("llama3", "qwen2")
DEFAULT_STEPS = 40  # 0% -> 100% held-out harmful refusal, 0% pseudo-harmful, ~55 s warm on 2 cores
ASSETS_NAME = "assets_harc"
SOURCES_NAME = "sources"
DATA_NAME = "data"
OWN_OUTPUTS = (RUN_DIR_NAME, SOURCES_NAME, DATA_NAME, RECIPE_NAME, LOG_NAME)
SOURCE_ROWS = 48  # rows per source file (harmful, harmless); 12 pseudo-harmful
LOGGING_STEPS = 5
ROLES = ("harc_harmful", "harc_harmless", "harc_pseudo", "harc_harmful_completions")
# (file in the run's folder, what it is) for the summary
OUTPUTS = (
    ("adapter_model.safetensors", "LoRA adapter"),
    ("harc_eval.json", "refusal rates, validation cosines"),
    ("harc_layers.json", "coupled layers over the run"),
    ("harc_directions.pt", "refusal / harmfulness directions"),
    ("trainer_log.jsonl", "per-step log (trainer_log.jsonl)"),
)


def build_harc_recipe(
    model: Path, template: str, data_dir: Path, run_dir: Path, steps: int, logging_steps: int = LOGGING_STEPS
) -> dict[str, Any]:
    """A ``stage: harc`` recipe for a tiny text model, scaled down so that a short run shows the base extraction,
    refreshes and the ramp."""
    return demo_recipe(
        "harc",
        model,
        template,
        data_dir,
        run_dir,
        steps,
        logging_steps,
        lora_target="all",
        lora_rank=8,
        lora_alpha=16,
        **{role: role for role in ROLES},
        harc_extract_samples=16,
        harc_validate_samples=8,
        harc_band=1,
        harc_refresh_steps=20,
        harc_layers_ramp_step=40,
        harc_eval_max_new_tokens=16,
    )


def convert_sources(ctx: DemoContext) -> int:
    """Write the tiny sources and run ``harc-data`` on them, its lines shown; return its exit code."""
    # lazy: torch, once the HARC demo runs
    from llamafactory_hera.fixtures.harc_assets import write_source_files

    sources = write_source_files(ctx.folder / SOURCES_NAME, count=SOURCE_ROWS)
    say(
        f"tiny copies of the public sources in {ctx.folder / SOURCES_NAME}: "
        + ", ".join(path.name for path in sources.values())
    )
    given = [str(part) for flag, path in sources.items() for part in (flag, path)]
    converter = [
        str(ctx.hera_cli),
        "harc-data",
        *given,
        "--harmless-rows",
        str(SOURCE_ROWS),
        "--out",
        str(ctx.folder / DATA_NAME),
    ]
    say("converting: " + command(*converter).strip())
    proc = subprocess.run(converter, env=ctx.env, capture_output=True, text=True)
    for line in (proc.stdout + proc.stderr).splitlines():
        print(f"  {line}", flush=True)
    return proc.returncode


def _rate(record: dict[str, Any], group: str) -> str:
    """``3/8 (38%)`` for one group (``harmful`` / ``pseudo``) of a refusal record."""
    part = record[group]
    if not part["count"]:
        return "n/a"
    return f"{part['refusals']}/{part['count']} ({100 * part['refusals'] / part['count']:.0f}%)"


def _example(record: dict[str, Any], group: str) -> str:
    """The first greedy answer of a group, quoted and cut to 70 characters."""
    examples = record[group]["examples"]
    if not examples:
        return ""
    answer = " ".join(examples[0]["answer"].split())
    return repr(answer if len(answer) <= 70 else answer[:67] + "...")


def refusal_lines(run_dir: Path) -> list[str]:
    """Refusal rates before (the base model: adapter disabled) and after, with one answer each."""
    path = run_dir / "harc_eval.json"
    refusal = json.loads(path.read_text(encoding="utf-8")).get("refusal") if path.is_file() else None
    if not refusal:
        return [f"  refusal rates: not found ({path} has no 'refusal')"]
    before = refusal["before"]
    return [
        "Refusal rate (greedy answers, refusal-phrase matcher; before = the base model, the adapter disabled):",
        f"  held-out harmful prompts   {_rate(before, 'harmful'):>12} -> {_rate(refusal, 'harmful'):<12} (should rise)",
        f"  pseudo-harmful prompts     {_rate(before, 'pseudo'):>12} -> {_rate(refusal, 'pseudo'):<12} "
        "(benign prompts that look harmful, drawn from harc_pseudo; should stay low)",
        f"  a held-out harmful prompt, answer before: {_example(before, 'harmful')}",
        f"                             answer after:  {_example(refusal, 'harmful')}",
    ]


def harc_summary(ctx: DemoContext, elapsed: float, model: Path, template: str) -> str:
    paths = {"datasets (harc-data output)": ctx.folder / DATA_NAME, "full training output": ctx.log}
    return summary_text(
        ctx,
        TITLE,
        elapsed,
        OUTPUTS,
        paths,
        figures=refusal_lines(ctx.run_dir),
        next_steps=[
            f"Next steps (the next HARC demo run replaces {ctx.folder}; the other demos leave it):",
            "  1. chat with the adapter, greedy (sampling a tiny random model prints noise); try a harmful prompt:",
            chat_command(ctx, model, template, "--max_new_tokens", "32"),
            "  2. evaluate the run against its base model: jailbreak attacks, over-refusal and the demo questions (the "
            "trade-off table and plot; add gcg with --attacks direct,prefilling,templates,gcg):",
            *eval_base_lines(ctx, "jailbreak,demo"),
            "  3. a real model: convert the public sources, then train (see recipes/llama3_1_8b_harc.yaml):",
            "     llamafactory-hera harc-data --circuit-breakers circuit_breakers_train.json --xstest "
            "xstest_v2_completions_gpt4_gpteval.csv --ultrachat test_sft.parquet --out data/harc",
            "     llamafactory-cli train recipes/llama3_1_8b_harc.yaml",
            f"  4. the recipe of this run: {ctx.recipe}",
        ],
    )


def run(ctx: DemoContext) -> int:
    # lazy: torch, once the HARC demo runs
    from llamafactory_hera.fixtures.harc_assets import build_harc_assets

    assets = prepare_assets(ctx, "tiny text models", build_harc_assets)
    code = convert_sources(ctx)
    if code != 0:
        print(f"error: llamafactory-hera harc-data failed with exit code {code}", file=sys.stderr)
        return code
    model = assets.models[ctx.family]
    template = assets.templates[ctx.family]
    steps = ctx.steps or DEFAULT_STEPS
    logging_steps = min(LOGGING_STEPS, steps)
    recipe = build_harc_recipe(model, template, ctx.folder / DATA_NAME, ctx.run_dir, steps, logging_steps)
    return train_and_report(ctx, recipe, lambda elapsed: harc_summary(ctx, elapsed, model, template), logging_steps)
