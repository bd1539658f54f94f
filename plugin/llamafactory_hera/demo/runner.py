"""Running the stock ``llamafactory-cli train`` for a demo."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from llamafactory_hera.demo.console import ProgressFilter
from llamafactory_hera.demo.folders import LOG_NAME, RECIPE_NAME, RUN_DIR_NAME, DemoError

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "DISABLE_VERSION_CHECK": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_DISABLED": "true",
}
Assets = TypeVar("Assets")


@dataclass(frozen=True)
class DemoContext:
    """One demo run: ``folder`` (``output / method``) holds ``recipe.yaml``, ``train.log`` and ``run/``."""

    output: Path  # the demos' root (--output); these three paths absolute
    folder: Path  # this method's folder
    assets: Path  # the tiny assets' folder (built on first use)
    family: str  # tiny model family
    steps: int | None  # optimizer steps (None: the method takes none)
    cli: Path  # llamafactory-cli
    env: dict[str, str]  # the children's environment (network off, caches under output/.cache)
    show: str  # what of the training output is shown: "progress", "all" or "none"

    @property
    def run_dir(self) -> Path:
        return self.folder / RUN_DIR_NAME

    @property
    def recipe(self) -> Path:
        return self.folder / RECIPE_NAME

    @property
    def log(self) -> Path:
        return self.folder / LOG_NAME

    @property
    def hera_cli(self) -> Path:
        """``llamafactory-hera`` beside ``llamafactory-cli``."""
        return self.cli.with_name("llamafactory-hera")


def find_cli() -> Path:
    """``llamafactory-cli`` next to this interpreter, else on ``PATH``."""
    beside = Path(sys.executable).with_name("llamafactory-cli")
    if beside.is_file():
        return beside
    found = shutil.which("llamafactory-cli")
    if found is None:
        raise DemoError(f"llamafactory-cli not found next to {sys.executable} or on PATH; `pip install llamafactory`.")
    return Path(found)


def offline_env(cache_dir: Path) -> dict[str, str]:
    """This environment with the network off, caches under ``cache_dir`` and, unless set, one OpenMP thread: on a
    busy machine spinning threads made a HARC demo 20x slower."""
    env = dict(os.environ)
    env.update(OFFLINE_ENV)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["HF_HOME"] = str(cache_dir / "hf_home")
    env["MPLCONFIGDIR"] = str(cache_dir / "mpl")
    return env


def say(message: str) -> None:
    """A ``[demo]`` line, flushed (it interleaves with the children's output)."""
    print(f"[demo] {message}", flush=True)


def train(ctx: DemoContext, logging_steps: int = 1) -> int:
    """Run ``llamafactory-cli train`` on the recipe, all output to ``ctx.log`` and to stdout per ``ctx.show``; on
    failure print the log's last lines and the exit code; return it."""
    say(f"running: {shlex.join([str(ctx.cli), 'train', str(ctx.recipe)])}")
    say(f"full output: {ctx.log}" + ("" if ctx.show == "all" else " (--verbose shows it here)"))
    progress = ProgressFilter(ctx.steps or 1, lambda line: print(line, flush=True), logging_steps)
    with (
        open(ctx.log, "wb") as log,
        subprocess.Popen(
            [str(ctx.cli), "train", str(ctx.recipe)],
            cwd=ctx.folder,
            env=ctx.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        ) as proc,
    ):
        assert proc.stdout is not None
        while chunk := proc.stdout.read1(65536):
            log.write(chunk)
            log.flush()
            if ctx.show == "all":
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
            elif ctx.show == "progress":
                progress.feed(chunk.decode("utf-8", errors="replace"))
        progress.close()
        code = proc.wait()
    if code != 0:
        tail = ctx.log.read_text(encoding="utf-8", errors="replace").splitlines()[-40:]
        if ctx.show != "all":
            print("\n".join(tail), file=sys.stderr)
        print(f"error: llamafactory-cli train failed with exit code {code}; full output in {ctx.log}", file=sys.stderr)
    return code


def demo_recipe(
    stage: str,
    model: Any,
    template: str,
    dataset_dir: Path,
    run_dir: Path,
    steps: int | None = None,
    logging_steps: int = 1,
    **keys: Any,
) -> dict[str, Any]:
    """A LoRA run of ``stage`` on ``model`` into ``run_dir`` (paths absolute, seed 0); with ``steps``, that many
    optimizer steps at a constant learning rate, plotted; then the method's ``keys``."""
    recipe = {
        "model_name_or_path": str(model),
        "template": template,
        "stage": stage,
        "do_train": True,
        "finetuning_type": "lora",
        "dataset_dir": str(dataset_dir),
        "output_dir": str(run_dir),
        "overwrite_output_dir": True,
        "report_to": "none",
        "seed": 0,
    }
    if steps is not None:
        recipe |= {
            "max_steps": steps,
            "gradient_accumulation_steps": 1,
            "learning_rate": 1.0e-3,
            "lr_scheduler_type": "constant",
            "logging_steps": logging_steps,
            "save_strategy": "no",
            "plot_loss": True,
        }
    return recipe | keys


def prepare_assets(ctx: DemoContext, what: str, build: Callable[[Path], Assets]) -> Assets:
    """Build (or reuse) the assets (``what``) in ``ctx.assets``, saying where and how long it took."""
    start = time.perf_counter()
    say(f"{what} in {ctx.assets} (built on first use) ...")
    assets = build(ctx.assets)
    say(f"assets ready ({time.perf_counter() - start:.1f}s)")
    return assets


def train_and_report(
    ctx: DemoContext, recipe: dict[str, Any], summary: Callable[[float], str], logging_steps: int = 1
) -> int:
    """Write ``recipe``, train, and on success print ``summary(training seconds)``; return the exit code."""
    ctx.recipe.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")  # keys in the given order
    say(f"recipe {ctx.recipe}")
    train_start = time.perf_counter()
    code = train(ctx, logging_steps)
    if code == 0:
        print(summary(time.perf_counter() - train_start))
    return code
