"""RAH-LoRA's demo (``--method rah``): a ``stage: rah`` calibration of the HeRA demo's tiny MLLMs, into ``DIR/rah/``.
At 4 heads per layer the paper's percentiles keep one head at most: the demo loosens them, and says so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llamafactory_hera.demo.folders import LOG_NAME, RECIPE_NAME, RUN_DIR_NAME
from llamafactory_hera.demo.runner import DemoContext, demo_recipe, prepare_assets, train_and_report
from llamafactory_hera.demo.summary import chat_command, eval_base_lines, summary_text
from llamafactory_hera.fixtures import TinyAssets, build_tiny_assets

TITLE = "RAH-LoRA"
FAMILIES = ("qwen3_vl", "qwen2_5_vl", "llava")
DEFAULT_STEPS = None  # training-free: no optimizer step
ASSETS_NAME = "assets"  # the HeRA demo's tiny models
OWN_OUTPUTS = (RUN_DIR_NAME, RECIPE_NAME, LOG_NAME)
# so that tiny 4-head layers have targets at all (the recipes keep the paper's values)
DEMO_THRESHOLDS = {
    "rah_isal_percentile": 50,
    "rah_caf_percentile": 0,
    "rah_beta": -100.0,
    "rah_num_anchors": 2,
    "rah_rank": 2,
}
# (file in the run's folder, what it is) for the summary
OUTPUTS = (
    ("adapter_model.safetensors", "LoRA adapter (PEFT)"),
    ("adapter_config.json", "adapter config"),
    ("rah_profile.json", "profile (scores, targets, KL)"),
    ("rah_profile.png", "I-SAL and CAF heatmaps"),
)


def build_rah_recipe(assets: TinyAssets, family: str, run_dir: Path) -> dict[str, Any]:
    """A ``stage: rah`` recipe for one tiny family (paths absolute)."""
    return demo_recipe(
        "rah",
        assets.models[family],
        assets.templates[family],
        assets.dataset_dir,
        run_dir,
        trust_remote_code=True,
        dataset="hera_demo",
        cutoff_len=256,
        overwrite_cache=True,
        preprocessing_num_workers=1,
        rah_layers="auto",
        rah_samples=32,
        rah_probe_samples=16,
        rah_kl_samples=8,
        **DEMO_THRESHOLDS,
    )


def rah_summary(ctx: DemoContext, elapsed: float, template: str, model: str) -> str:
    profile_path = ctx.run_dir / "rah_profile.json"
    profile = json.loads(profile_path.read_text(encoding="utf-8")) if profile_path.is_file() else {}
    summary = profile.get("summary", {})
    targets = [f"{t['head']} ({t['outcome']}, alpha {t['alpha']:g})" for t in profile.get("targets", [])]
    return summary_text(
        ctx,
        TITLE,
        elapsed,
        OUTPUTS,
        {"full output": ctx.log},
        plots=False,
        figures=[
            f"  layers {profile.get('layers')}; targets: {', '.join(targets) or 'none'}",
            f"  calibrated {summary.get('calibrated')} of {summary.get('targets')}; mean KL to the original model on "
            f"the probe {summary.get('kl_to_original', float('nan')):.3g}",
            "  (tiny 4-head layers: targets found with loosened thresholds "
            + ", ".join(f"{k}: {v}" for k, v in DEMO_THRESHOLDS.items())
            + "; the recipes keep the paper's)",
        ],
        next_steps=[
            "Next steps:",
            "  1. chat with the calibrated model (the adapter loads like any LoRA adapter; greedy, since "
            "sampling a tiny random model prints noise):",
            chat_command(ctx, model, template),
            "  2. evaluate the calibrated model against the base model:",
            *eval_base_lines(ctx),
            "  3. calibrate a real model: llamafactory-cli train recipes/vicuna_7b_rah.yaml",
            f"  4. the recipe of this run: {ctx.recipe}",
        ],
    )


def run(ctx: DemoContext) -> int:
    assets = prepare_assets(ctx, "tiny assets", build_tiny_assets)
    template = assets.templates[ctx.family]
    model = str(assets.models[ctx.family])
    return train_and_report(
        ctx,
        build_rah_recipe(assets, ctx.family, ctx.run_dir),
        lambda elapsed: rah_summary(ctx, elapsed, template, model),
    )
