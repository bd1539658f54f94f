"""HeRA's demo (the default method): a 20-step ``stage: hera`` LoRA run on a tiny offline MLLM with the stock
``llamafactory-cli train``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llamafactory_hera.demo.folders import LOG_NAME, RECIPE_NAME, RUN_DIR_NAME
from llamafactory_hera.demo.runner import DemoContext, demo_recipe, prepare_assets, train_and_report
from llamafactory_hera.demo.summary import command, eval_base_lines, first_last, read_log, summary_text
from llamafactory_hera.fixtures import TinyAssets, build_tiny_assets

TITLE = "HeRA"
FAMILIES = ("qwen3_vl", "qwen2_5_vl", "llava")
DEFAULT_STEPS = 20
ASSETS_NAME = "assets"  # shared with the RAH-LoRA demo (same tiny models)
DEMO_HEADS = ["L1H0", "L1H2"]  # the tiny models have >= 2 layers and 4 heads
# what the demo and its printed next steps create in its folder (the next HeRA demo replaces them)
OWN_OUTPUTS = (
    RUN_DIR_NAME,
    "run_sft",
    "run_selected",
    RECIPE_NAME,
    LOG_NAME,
    "recipe_selected.yaml",
    "recipe_selected.hera_selection.json",
    "recipe_selected.hera_selection.png",
    "recipe_selected.hera_selection.log",
)
# (file in the run's folder, what it is) for the summary
OUTPUTS = (
    ("adapter_model.safetensors", "LoRA adapter"),
    ("trainer_log.jsonl", "per-step log (trainer_log.jsonl)"),
    ("trainer_state.json", "HF trainer state"),
    ("hera_state.json", "learned temperature (hera_state)"),
    ("hera_run.json", "HeRA settings (hera_run)"),
)


def build_recipe(assets: TinyAssets, family: str, run_dir: Path, steps: int) -> dict[str, Any]:
    """A small ``stage: hera`` LoRA recipe for one tiny family (paths absolute)."""
    return demo_recipe(
        "hera",
        assets.models[family],
        assets.templates[family],
        assets.dataset_dir,
        run_dir,
        steps,
        trust_remote_code=True,
        lora_target="all",
        dataset="hera_demo",
        cutoff_len=256,
        max_samples=64,
        overwrite_cache=True,
        preprocessing_num_workers=1,
        dataloader_num_workers=0,
        per_device_train_batch_size=8,
        hera_heads=list(DEMO_HEADS),
        hera_teacher=str(assets.teacher),
        hera_k=3,
    )


def summary(ctx: DemoContext, elapsed: float) -> str:
    run_dir = ctx.run_dir
    folder = ctx.folder
    cli = ctx.cli
    log = read_log(run_dir)
    selected = folder / "recipe_selected.yaml"
    twin = folder / "run_sft"
    return summary_text(
        ctx,
        TITLE,
        elapsed,
        OUTPUTS,
        {"full training output": ctx.log},
        figures=[
            f"  lm_loss   {first_last(log, 'lm_loss')}",
            f"  hera_loss {first_last(log, 'hera_loss')}",
        ],
        next_steps=[
            f"Next steps (each writes into {folder}; the next HeRA demo run replaces them, "
            "the other demos leave them):",
            "  1. choose the heads by MKNN (the least aligned), into a copy of the recipe:",
            command(ctx.hera_cli, "select", ctx.recipe, "--output", selected),
            command(cli, "train", selected, f"output_dir={folder / 'run_selected'}"),
            "  2. every head's alignment before and after this run (heatmaps, delta table):",
            command(ctx.hera_cli, "select", "--report", run_dir),
            "  3. the SFT baseline twin (same recipe, HeRA off; its hera_* keys are ignored with a warning):",
            command(cli, "train", ctx.recipe, "stage=sft", f"output_dir={twin}"),
            "  4. evaluate the run against its SFT twin (after step 3), or against the base model:",
            command(ctx.hera_cli, "eval", run_dir, "--baseline", twin, "--tasks", "demo"),
            *eval_base_lines(ctx),
        ],
    )


def run(ctx: DemoContext) -> int:
    assets = prepare_assets(ctx, "tiny assets", build_tiny_assets)
    recipe = build_recipe(assets, ctx.family, ctx.run_dir, ctx.steps or DEFAULT_STEPS)
    return train_and_report(ctx, recipe, lambda elapsed: summary(ctx, elapsed))
