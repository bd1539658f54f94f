"""The RAH-LoRA variant of the demo (``python3 dev.py demo --method rah``): recipe and summary.

The tiny models have 4 heads per layer, where the paper's percentiles (I-SAL below the 15th, CAF above the
70th) keep at most one head and usually none; the demo loosens them (50th / 0th, anchors from every other
head) and says so, so that the run shows targets, anchors, a trust region and an adapter.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from llamafactory_hera.fixtures import TinyAssets

# what the tiny 4-head layers need to have targets at all (the recipes keep the paper's values)
DEMO_THRESHOLDS = {"rah_isal_percentile": 50, "rah_caf_percentile": 0, "rah_beta": -100.0, "rah_num_anchors": 2,
                   "rah_rank": 2}


def build_rah_recipe(assets: TinyAssets, family: str, run_dir: Path) -> dict[str, Any]:
    """A ``stage: rah`` recipe for one tiny model family (paths absolute)."""
    return {
        "model_name_or_path": str(assets.models[family]), "trust_remote_code": True, "stage": "rah",
        "do_train": True, "finetuning_type": "lora", "dataset": "hera_demo", "dataset_dir": str(assets.dataset_dir),
        "template": assets.templates[family], "cutoff_len": 256, "overwrite_cache": True,
        "preprocessing_num_workers": 1, "output_dir": str(run_dir), "overwrite_output_dir": True,
        "report_to": "none", "seed": 0, "rah_layers": "auto", "rah_samples": 32, "rah_probe_samples": 16,
        "rah_kl_samples": 8, **DEMO_THRESHOLDS,
    }


def rah_summary(output: Path, run_dir: Path, recipe: Path, cli: Path, elapsed: float, template: str,
                model: str) -> str:
    """Outputs, the profile's figures and the next steps of a finished RAH-LoRA demo."""
    profile_path = run_dir / "rah_profile.json"
    profile = json.loads(profile_path.read_text(encoding="utf-8")) if profile_path.is_file() else {}
    summary = profile.get("summary", {})

    def where(name: str, what: str) -> str:
        path = run_dir / name
        return f"  {what:<34} {path}{'' if path.exists() else '  (missing)'}"

    targets = [f"{t['head']} ({t['outcome']}, alpha {t['alpha']:g})" for t in profile.get("targets", [])]
    return "\n".join([
        "",
        f"RAH-LoRA demo finished in {elapsed:.1f}s. Outputs in {run_dir}:",
        where("adapter_model.safetensors", "LoRA adapter (PEFT)"),
        where("adapter_config.json", "adapter config"),
        where("rah_profile.json", "profile (scores, targets, KL)"),
        where("rah_profile.png", "I-SAL and CAF heatmaps"),
        f"  {'full output':<34} {output / 'train.log'}",
        "",
        f"  layers {profile.get('layers')}; targets: {', '.join(targets) or 'none'}",
        f"  calibrated {summary.get('calibrated')} of {summary.get('targets')}; mean KL to the original model on "
        f"the probe {summary.get('kl_to_original', float('nan')):.3g}",
        "  (tiny 4-head layers: targets found with loosened thresholds "
        + ", ".join(f"{k}: {v}" for k, v in DEMO_THRESHOLDS.items()) + "; the recipes keep the paper's)",
        "",
        "Next steps:",
        "  1. chat with the calibrated model (the adapter loads like any LoRA adapter):",
        "     " + shlex.join([str(cli), "chat", "--model_name_or_path", model, "--adapter_name_or_path", str(run_dir),
                             "--template", template]),
        "  2. calibrate a real model: llamafactory-cli train recipes/vicuna_7b_rah.yaml",
        f"  3. the recipe of this run: {recipe}",
    ])
