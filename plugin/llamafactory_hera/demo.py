"""A two-minute, offline HeRA demo on a tiny random-weight MLLM.

``python -m llamafactory_hera.demo [--method hera|rah] [--output DIR] [--family qwen3_vl|qwen2_5_vl|llava] [--steps N]
[--verbose]``

1. builds (or reuses) the tiny offline assets (:func:`llamafactory_hera.fixtures.build_tiny_assets`):
   a 2–3 layer Qwen3-VL / Qwen2.5-VL / LLaVA, a tiny DINOv2 teacher and a 32-image caption set;
2. writes ``DIR/recipe.yaml``, an ordinary LLaMA-Factory recipe with ``stage: hera`` (LoRA);
3. runs the stock ``llamafactory-cli train DIR/recipe.yaml`` with the network switched off, keeping its whole
   output in ``DIR/train.log`` and showing the plugin's lines and one line per step (``--verbose``: everything);
4. prints where the outputs and plots are, the first/last ``lm_loss`` and ``hera_loss``, and the next steps
   (choosing heads with ``select``, the before/after ``--report``, the SFT baseline twin).

The demo owns ``DIR`` (it leaves a marker file there): running it again replaces its previous outputs and says
which. A folder without the marker that already holds a ``run/`` is refused unless ``--overwrite``.
Nothing here is needed to use HeRA: it only shows what a HeRA run looks like. ``--method rah`` shows a
RAH-LoRA calibration instead (:mod:`llamafactory_hera.demo_rah`).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from llamafactory_hera.demo_console import ProgressFilter
from llamafactory_hera.demo_rah import build_rah_recipe, rah_summary
from llamafactory_hera.fixtures import TinyAssets, build_tiny_assets

FAMILIES = ("qwen3_vl", "qwen2_5_vl", "llava")
DEMO_HEADS = ["L1H0", "L1H2"]  # the tiny models have >= 2 layers and 4 heads
RUN_DIR_NAME = "run"
RECIPE_NAME = "recipe.yaml"
LOG_NAME = "train.log"
MARKER_NAME = ".llamafactory_hera_demo"  # this folder was made by the demo: its outputs may be replaced
# what the demo and the next steps it prints create in DIR (replaced on the next demo run); assets/ is kept
OWN_OUTPUTS = (RUN_DIR_NAME, "run_sft", "run_selected", RECIPE_NAME, LOG_NAME, "recipe_selected.yaml",
               "recipe_selected.hera_selection.json", "recipe_selected.hera_selection.png",
               "recipe_selected.hera_selection.log")
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "DISABLE_VERSION_CHECK": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_DISABLED": "true",
}


class DemoError(RuntimeError):
    """A problem the user can fix; printed without a traceback."""


def build_recipe(assets: TinyAssets, family: str, run_dir: Path, steps: int) -> dict[str, Any]:
    """A small LoRA recipe with ``stage: hera`` for one tiny model family (paths absolute)."""
    return {
        "model_name_or_path": str(assets.models[family]),
        "trust_remote_code": True,
        "stage": "hera",
        "do_train": True,
        "finetuning_type": "lora",
        "lora_target": "all",
        "dataset": "hera_demo",
        "dataset_dir": str(assets.dataset_dir),
        "template": assets.templates[family],
        "cutoff_len": 256,
        "max_samples": 64,
        "overwrite_cache": True,
        "preprocessing_num_workers": 1,
        "dataloader_num_workers": 0,
        "per_device_train_batch_size": 8,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1.0e-3,
        "max_steps": steps,
        "lr_scheduler_type": "constant",
        "logging_steps": 1,
        "save_strategy": "no",
        "plot_loss": True,
        "output_dir": str(run_dir),
        "overwrite_output_dir": True,
        "report_to": "none",
        "seed": 0,
        "hera_heads": list(DEMO_HEADS),
        "hera_teacher": str(assets.teacher),
        "hera_k": 3,
    }


def find_cli() -> Path:
    """The ``llamafactory-cli`` installed next to this interpreter (falls back to ``PATH``)."""
    beside = Path(sys.executable).with_name("llamafactory-cli")
    if beside.is_file():
        return beside
    found = shutil.which("llamafactory-cli")
    if found is None:
        raise DemoError(f"llamafactory-cli not found next to {sys.executable} or on PATH; `pip install llamafactory`.")
    return Path(found)


def owns(output: Path) -> bool:
    """``output`` was made by the demo (marker file; or, from before the marker, the demo's asset build)."""
    return (output / MARKER_NAME).is_file() or (output / "assets" / "fixtures_stamp.json").is_file()


def prepare_output(output: Path, overwrite: bool) -> list[str]:
    """Make room for a new demo run in ``output``; return the names of the earlier outputs removed.

    The demo's own folder (see :func:`owns`) is cleared of :data:`OWN_OUTPUTS` (assets are kept as a cache);
    any other folder with a non-empty ``run/`` is refused unless ``overwrite``.
    """
    run_dir = output / RUN_DIR_NAME
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())) and not (overwrite or owns(output)):
        raise DemoError(f"{run_dir} already exists, is not empty and was not made by the demo; pass --overwrite "
                        "to replace it, or choose another --output.")
    removed = []
    for name in OWN_OUTPUTS if owns(output) else (RUN_DIR_NAME,):
        path = output / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


def offline_env(cache_dir: Path) -> dict[str, str]:
    """This process's environment with the network off and caches under ``cache_dir``."""
    env = dict(os.environ)
    env.update(OFFLINE_ENV)
    env["HF_HOME"] = str(cache_dir / "hf_home")
    env["MPLCONFIGDIR"] = str(cache_dir / "mpl")
    return env


def run_training(cli: Path, recipe: Path, log_path: Path, env: dict[str, str], show: str, steps: int) -> int:
    """Run ``llamafactory-cli train recipe``; all output to ``log_path``; on stdout per ``show``.

    ``show``: ``progress`` (the plugin's lines and one line per step), ``all`` or ``none``.
    """
    def echo(line: str) -> None:
        print(line, flush=True)

    progress = ProgressFilter(steps, echo)
    with open(log_path, "wb") as log, subprocess.Popen([str(cli), "train", str(recipe)], cwd=recipe.parent, env=env,
                                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        assert proc.stdout is not None
        while chunk := proc.stdout.read1(65536):
            log.write(chunk)
            log.flush()
            if show == "all":
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
            elif show == "progress":
                progress.feed(chunk.decode("utf-8", errors="replace"))
        progress.close()
        return proc.wait()


def read_log(run_dir: Path) -> list[dict[str, Any]]:
    """Lines of ``trainer_log.jsonl`` (empty if missing)."""
    path = run_dir / "trainer_log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _first_last(log: list[dict[str, Any]], key: str) -> str:
    values = [entry[key] for entry in log if key in entry]
    if not values:
        return "not logged"
    return f"{values[0]:.4f} -> {values[-1]:.4f}  ({len(values)} logged steps)"


def summary(output: Path, run_dir: Path, recipe: Path, cli: Path, elapsed: float) -> str:
    """Human-readable report of a finished demo run: outputs, every plot, losses, next steps."""
    def where(name: str, what: str) -> str:
        path = run_dir / name
        return f"  {what:<34} {path}{'' if path.exists() else '  (missing)'}"

    log = read_log(run_dir)
    hera_cli = cli.with_name("llamafactory-hera")
    selected = output / "recipe_selected.yaml"
    plots = sorted(run_dir.glob("*.png"))
    lines = [
        "",
        f"HeRA demo finished in {elapsed:.1f}s. Outputs in {run_dir}:",
        where("adapter_model.safetensors", "LoRA adapter"),
        where("trainer_log.jsonl", "per-step log (trainer_log.jsonl)"),
        where("trainer_state.json", "HF trainer state"),
        where("hera_state.json", "learned temperature (hera_state)"),
        where("hera_run.json", "HeRA settings (hera_run)"),
        f"  {'full training output':<34} {output / LOG_NAME}",
        f"Plots ({len(plots)}):",
        *[f"  {path}" for path in plots],
        "",
        f"  lm_loss   {_first_last(log, 'lm_loss')}",
        f"  hera_loss {_first_last(log, 'hera_loss')}",
        "",
        "Next steps (each writes into this folder; the next demo run replaces them):",
        "  1. choose the heads by MKNN (the least aligned), into a copy of the recipe:",
        "     " + shlex.join([str(hera_cli), "select", str(recipe), "--output", str(selected)]),
        "     " + shlex.join([str(cli), "train", str(selected), f"output_dir={output / 'run_selected'}"]),
        "  2. every head's alignment before and after this run (heatmaps, delta table):",
        "     " + shlex.join([str(hera_cli), "select", "--report", str(run_dir)]),
        "  3. the SFT baseline twin (same recipe, HeRA off; its hera_* keys are ignored with a warning):",
        "     " + shlex.join([str(cli), "train", str(recipe), "stage=sft", f"output_dir={output / 'run_sft'}"]),
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog="python -m llamafactory_hera.demo",
                                     description="Run a tiny offline HeRA training with the stock llamafactory-cli.")
    parser.add_argument("--output", type=Path, default=Path("demo_output"),
                        help="folder for recipe.yaml, train.log and run/ (default: ./demo_output)")
    parser.add_argument("--assets", type=Path, default=None,
                        help="folder of the tiny assets, built if missing (default: OUTPUT/assets)")
    parser.add_argument("--method", choices=("hera", "rah"), default="hera",
                        help="hera: a HeRA training run (default); rah: a RAH-LoRA calibration")
    parser.add_argument("--family", choices=FAMILIES, default="qwen3_vl", help="tiny model family (default: qwen3_vl)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps (default: 20)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty OUTPUT/run in a folder the demo did not make (its own folder is "
                        "always reused)")
    shown = parser.add_mutually_exclusive_group()
    shown.add_argument("--verbose", action="store_true", help="show LLaMA-Factory's whole output (always in "
                       "OUTPUT/train.log)")
    shown.add_argument("--quiet", action="store_true", help="show no training progress, only the summary")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = parse_args(argv)
    output = args.output.resolve()
    run_dir = output / RUN_DIR_NAME
    try:
        removed = prepare_output(output, args.overwrite)
        cli = find_cli()
    except DemoError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if removed:
        print(f"[demo] replaced the previous demo outputs in {output}: {', '.join(removed)}", flush=True)

    start = time.perf_counter()
    assets_root = (args.assets or output / "assets").resolve()
    print(f"[demo] tiny assets in {assets_root} (built on first use) ...", flush=True)
    assets = build_tiny_assets(assets_root)
    print(f"[demo] assets ready ({time.perf_counter() - start:.1f}s)", flush=True)

    output.mkdir(parents=True, exist_ok=True)
    (output / MARKER_NAME).write_text("made by python -m llamafactory_hera.demo; the next demo run replaces "
                                      f"{', '.join(OWN_OUTPUTS)} here\n", encoding="utf-8")
    recipe = output / RECIPE_NAME
    content = build_rah_recipe(assets, args.family, run_dir) if args.method == "rah" else \
        build_recipe(assets, args.family, run_dir, args.steps)
    recipe.write_text(yaml.safe_dump(content, sort_keys=False), encoding="utf-8")
    print(f"[demo] recipe {recipe}", flush=True)
    print(f"[demo] running: {shlex.join([str(cli), 'train', str(recipe)])}", flush=True)
    print(f"[demo] full output: {output / LOG_NAME}" + ("" if args.verbose else " (--verbose shows it here)"),
          flush=True)
    train_start = time.perf_counter()
    show = "all" if args.verbose else "none" if args.quiet else "progress"
    code = run_training(cli, recipe, output / LOG_NAME, offline_env(output / ".cache"), show, args.steps)
    if code != 0:
        tail = (output / LOG_NAME).read_text(encoding="utf-8", errors="replace").splitlines()[-40:]
        if not args.verbose:
            print("\n".join(tail), file=sys.stderr)
        print(f"error: llamafactory-cli train failed with exit code {code}; full output in {output / LOG_NAME}",
              file=sys.stderr)
        return code
    elapsed = time.perf_counter() - train_start
    if args.method == "rah":
        print(rah_summary(output, run_dir, recipe, cli, elapsed, assets.templates[args.family],
                          str(assets.models[args.family])))
    else:
        print(summary(output, run_dir, recipe, cli, elapsed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
