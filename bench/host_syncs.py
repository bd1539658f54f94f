"""Host syncs per optimizer step of each method next to plain SFT, on the simulated accelerator of the tests.

A device-to-host transfer (``.item()``, ``.cpu()``, ``.tolist()``, ``nonzero``, a boolean mask, ``repeat_interleave``
without ``output_size``, a tensor's truth value) makes the host wait for the GPU; a step that has one cannot queue
the next step's kernels ahead. This script runs the real ``run_exp`` of LLaMA-Factory for ``stage: sft`` and each
method on the simulated accelerator (``llamafactory_hera_testing.accelerator``: real values on the CPU, another device
reported, every transfer counted with the frame that asked for it) and prints, per optimizer step, the transfers of a
logging step and of an ordinary step, for the method and for SFT on the same tiny model and data.

HeRA is compared with SFT on the tiny Qwen2.5-VL (teacher features cached before step 1, the default), without
its alignment monitor and with it scoring at every logging step (``hera_monitor_steps: LOGGING_STEPS``), HARC
with SFT on the tiny Llama-3 (harmless rows; HARC's refresh and ramp at step 100, so no step here refreshes or
ramps). Counts do not depend on the machine: they are the same on every run.

Usage: python bench/host_syncs.py [--steps 4] [--logging-steps 2] [--frames]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for _key, _value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                     "DISABLE_VERSION_CHECK": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_DISABLED": "true"}.items():
    os.environ.setdefault(_key, _value)


def _recipes(out: Path, steps: int, logging_steps: int) -> dict[str, dict[str, Any]]:
    """The recipes compared: each method and the SFT run it is compared with."""
    from llamafactory_hera.fixtures import build_tiny_assets
    from llamafactory_hera.fixtures.harc_assets import build_harc_assets
    from llamafactory_hera_testing.recipes import base_recipe, harc_recipe

    assets = build_tiny_assets(REPO / ".hera_assets" / "tests", seed=0)
    harc = build_harc_assets(REPO / ".hera_assets" / "harc", seed=0)
    common = {"max_steps": steps, "logging_steps": logging_steps, "save_strategy": "no", "plot_loss": False}
    hera = base_recipe(assets, "qwen2_5_vl", out / "hera", **common)
    sft_vl = {k: v for k, v in hera.items() if not k.startswith("hera_")} | {"stage": "sft",
                                                                           "output_dir": str(out / "sft_vl")}
    harc_run = harc_recipe(harc, "llama3", out / "harc", harc_refresh_steps=100, harc_layers_ramp_step=100,
                           harc_eval=False, **common)
    sft_text = {k: v for k, v in harc_run.items() if not k.startswith("harc_")} | {
        "stage": "sft", "dataset": "harc_harmless", "output_dir": str(out / "sft_text"),
        "per_device_train_batch_size": 12, "cutoff_len": 256}
    monitored = dict(hera, hera_monitor_steps=logging_steps, output_dir=str(out / "hera_monitor"))
    hera = dict(hera, hera_monitor_steps=0)
    return {"sft (Qwen2.5-VL)": sft_vl, "hera": hera, "hera, monitor at every logging step": monitored,
            "sft (Llama-3)": sft_text, "harc": harc_run}


def _run(recipe: dict[str, Any]) -> tuple[list[tuple[int, bool, Counter[str]]], list[str]]:
    """One run on the simulated accelerator; per-step counts and frames."""
    import pytest
    from llamafactory.train.tuner import run_exp

    from llamafactory_hera_testing.accelerator import SimulatedAccelerator
    from llamafactory_hera_testing.accelerator_run import StepSyncs, patch_for_simulated_device

    accelerator = SimulatedAccelerator()
    with pytest.MonkeyPatch.context() as monkeypatch:
        patch_for_simulated_device(monkeypatch, accelerator)
        steps = StepSyncs(accelerator)
        with accelerator:
            run_exp(recipe, callbacks=[steps])
    return steps.steps, steps.where


def _cell(counts: Counter[str]) -> str:
    waits = sum(n for kind, n in counts.items() if kind != "to device")
    kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(counts.items()) if kind != "to device")
    return f"{waits}" + (f" ({kinds})" if kinds else "") + f"; to device {counts.get('to device', 0)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--logging-steps", type=int, default=2)
    parser.add_argument("--frames", action="store_true", help="print the frame of every transfer")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="host_syncs_") as tmp:
        for name, recipe in _recipes(Path(tmp), args.steps, args.logging_steps).items():
            steps, where = _run(recipe)
            later = [s for s in steps if s[0] > 1]  # step 1 holds one-off set-up
            logged = next((c for _, is_logged, c in later if is_logged), Counter())
            other = next((c for _, is_logged, c in later if not is_logged), Counter())
            rows.append((name, logged, other))
            if args.frames:
                for (step, is_logged, _), frames in zip(steps, where, strict=True):
                    print(f"--- {name}, step {step}{' (logging)' if is_logged else ''}\n{frames}")
    print("\n| run | logging step: waits on the device (by kind); host-to-device copies | other step |")
    print("|---|---|---|")
    for name, logged, other in rows:
        print(f"| {name} | {_cell(logged)} | {_cell(other)} |")


if __name__ == "__main__":
    main()
