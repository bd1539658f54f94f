"""What a ``stage: harc`` run adds to ``output_dir`` (docs/harc.md, "Outputs"). Computed on every rank in step (ZeRO-3
needs all ranks in each forward), written by rank 0."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from llamafactory_hera.harc.config import TRAINING_PLOT
from llamafactory_hera.harc.evaluate import generate_answers, refusal_record
from llamafactory_hera.harc.plots import plot_diagnostics, plot_refusal
from llamafactory_hera.harc.state import STATE_FILE
from llamafactory_hera.plots.training import plot_training
from llamafactory_hera.training import sections

DIRECTIONS_FILE = "harc_directions.pt"
LAYERS_FILE = "harc_layers.json"
EVAL_FILE = "harc_eval.json"
EVAL_PLOT = "harc_eval.png"
DIAGNOSTICS_PLOT = "harc_diagnostics.png"


def _refusals(trainer: Any, model: Any) -> dict[str, Any]:
    run = trainer.harc_run
    args = trainer.harc_args

    def answers(rows: list[Any]) -> list[str]:
        return generate_answers(
            model,
            run.tokenizer,
            [row.prompt_ids for row in rows],
            args.harc_eval_max_new_tokens,
            args.harc_extract_batch_size,
            run.stop_ids,
            run.progress,
        )

    record = refusal_record(answers(run.rows.validate_harmful), answers(run.rows.eval_pseudo))
    with model.disable_adapter():
        record["before"] = refusal_record(answers(run.rows.validate_harmful), answers(run.rows.eval_pseudo))
    return record


def finish_run(trainer: Any) -> None:
    state = trainer.harc_state
    run = trainer.harc_run
    args = trainer.harc_args
    model = trainer.accelerator.unwrap_model(trainer.model)
    started = time.perf_counter()
    state.record(model, trainer.state.global_step, "end", 0.0)
    evaluation = _refusals(trainer, model) if args.harc_eval else None
    seconds = time.perf_counter() - started
    if trainer.is_world_process_zero():
        output = Path(trainer.args.output_dir)
        output.mkdir(parents=True, exist_ok=True)
        torch.save(state.as_record(), output / DIRECTIONS_FILE)
        layers = [
            {key: entry[key] for key in ("step", "event", "layers", "scores", "seconds")} for entry in state.history
        ]
        (output / LAYERS_FILE).write_text(
            json.dumps({"band": args.harc_band, "history": layers}, indent=2), encoding="utf-8"
        )
        record = {
            "refusal": evaluation,
            "validation": [{k: e[k] for k in ("step", "event", "layers", "validation")} for e in state.history],
            "rows": run.rows.counts,
            "refreshes": state.refreshes,
            "refresh_seconds": round(state.refresh_seconds, 3),
            "end_seconds": round(seconds, 3),
            "settings": asdict(args),
        }
        (output / EVAL_FILE).write_text(json.dumps(record, indent=2), encoding="utf-8")
        _plots(trainer, output, evaluation, state.history)
        (output / STATE_FILE).unlink(missing_ok=True)
        rates = ""
        if evaluation is not None:
            before = evaluation["before"]
            rates = (
                f"; refusal rate on held-out harmful prompts {_pct(before['refusal_rate_harmful'])}"
                f" -> {_pct(evaluation['refusal_rate_harmful'])}, on pseudo-harmful "
                f"{_pct(before['refusal_rate_pseudo'])} -> {_pct(evaluation['refusal_rate_pseudo'])}"
            )
        run.say(
            f"HARC: {state.refreshes} refreshes ({state.refresh_seconds:.1f} s), layers {state.layers}{rates}; "
            f"{DIRECTIONS_FILE}, {LAYERS_FILE}, {EVAL_FILE} and plots in {output}"
        )
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        with sections.collective("the barrier after HARC's evaluation"):
            torch.distributed.barrier()


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def _plots(trainer: Any, output: Path, evaluation: dict[str, Any] | None, history: list[dict[str, Any]]) -> None:
    if not trainer.harc_run.plot:
        return

    if evaluation is not None:
        plot_refusal(evaluation, output / EVAL_PLOT)
    plot_diagnostics(history, output / DIAGNOSTICS_PLOT)
    trainer.save_state()  # the curves are read from trainer_state.json's log history
    plot_training(output, "harc", TRAINING_PLOT, trainer.harc_run.smooth)
