"""A ``stage: hera`` run: LLaMA-Factory's SFT workflow with HeRA's collator and trainer, in place of ``run_sft``. Its
start line and end count keep a run that trains less HeRA than it seems from being silent.
"""

from __future__ import annotations

import os
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback
from typing_extensions import override

from llamafactory_hera import __version__
from llamafactory_hera.heads.geometry import head_names
from llamafactory_hera.hera import saved_state
from llamafactory_hera.hera.collator import HeraCollatorMixin, describe_image
from llamafactory_hera.hera.config import HERA_RUN_RECORD, TRAINING_PLOT, HeraArguments
from llamafactory_hera.hera.image_tokens import check_image_tokens
from llamafactory_hera.hera.loss import TAU_MAX, TAU_MIN
from llamafactory_hera.hera.monitor import MonitorCallback
from llamafactory_hera.hera.preparation_checks import (
    check_heads_train,
    check_same_heads_on_every_rank,
)
from llamafactory_hera.hera.teacher import load_image_processor
from llamafactory_hera.hera.teacher_cache import TeacherFeatureCache
from llamafactory_hera.hera.trainer import HeraTrainer
from llamafactory_hera.plots.training import plot_training
from llamafactory_hera.recipe.dataset_info import describe_data, first_unreadable
from llamafactory_hera.runtime.errors import RecipeError
from llamafactory_hera.runtime.log import PREFIX, line
from llamafactory_hera.runtime.parsed_arguments import HostArguments
from llamafactory_hera.runtime.run_record import plain, write_record
from llamafactory_hera.training import sections
from llamafactory_hera.training.eval_forward import keep_4bit_layout
from llamafactory_hera.training.trainer_base import MethodTrainer
from llamafactory_hera_patches.sft_classes import HostTrainer
from llamafactory_hera_patches.tools.model_data import RecipeArgs

if TYPE_CHECKING:  # the preparation's hand-over (phase 3's module)
    from llamafactory_hera.hera.preparation import HeraPreparation


class RunSummary(TrainerCallback):
    """Prints the start line at train begin (main process; after gradient checkpointing is re-enabled, before the
    monitor's step-0 point) and the micro-batches with a HeRA term at the end."""

    def __init__(
        self, trainer: Any, hera_args: HeraArguments, data_counts: Any, contrastive: Any, monitor: Any = None
    ) -> None:
        self.trainer = trainer
        self.hera_args = hera_args
        self.data_counts = data_counts
        self.contrastive = contrastive
        self.monitor = monitor
        self.said = False  # once: auto_find_batch_size restarts training after an OOM

    @override
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:  # noqa: D102
        if state.is_world_process_zero and not self.said:
            self.said = True
            print(self.start_line(), flush=True)

    def start_line(self) -> str:
        args = self.hera_args
        trainer = self.trainer
        geometry = self.contrastive
        temperature_lr = trainer.hera_temperature_lr
        processes = trainer.args.world_size
        precompute = trainer.hera_teacher.precompute_decision(trainer.train_dataset, trainer.args)
        monitor_line = (
            self.monitor.line()
            if self.monitor is not None
            else (
                "alignment monitor off ("
                + ("hera_monitor_steps: 0" if args.hera_monitor_steps == 0 else "no probe pairs")
                + ")"
            )
        )
        checkpointing_line = trainer.hera_checkpointing.line()
        if args.hera_learn_temperature:
            temperature = (
                f"temperature {args.hera_temperature} learned (lr {temperature_lr:g}, range [{TAU_MIN}, {TAU_MAX}])"
            )
        else:
            temperature = f"temperature {args.hera_temperature} fixed"
        gather = (
            f"gather on ({processes} processes)"
            if args.hera_gather and processes > 1
            else "gather off"
            if processes > 1
            else "gather n/a (1 process)"
        )
        queue = f"queue {geometry.queue if geometry.queue else 'off'} ({geometry.queue_reason})"
        precompute_on = "on" if precompute else "off"
        counts = self.data_counts
        if counts is None:
            data = "image rows: unknown (streaming)"
        else:
            data = f"image rows {counts.image_rows}/{counts.rows}"
            if counts.text_only_rows:
                data += f" ({counts.text_only_rows} text-only: LM loss only)"
            if counts.video_only_rows:
                data += f" ({counts.video_only_rows} video-only: LM loss only, videos have no teacher feature)"
        return (
            f"{PREFIX} HeRA: heads [{', '.join(head_names(args.hera_heads))}]; teacher {args.hera_teacher} "
            f"({args.hera_teacher_feature}); k {args.hera_k}; lambda {args.hera_lambda}; {temperature}; "
            f"pooling {args.hera_pooling}; {gather}; contrastive set up to {geometry.largest} samples; {queue}; "
            f"precompute {args.hera_teacher_precompute} -> {precompute_on}; {data}; {monitor_line}; "
            f"{checkpointing_line}"
        )

    @override
    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """The micro-batches with a HeRA term (the steps after the last log read first)."""
        sums = self.trainer.hera_sums
        sums.read(self.trainer.hera_log_tau, reduce=False)
        if not state.is_world_process_zero or sums.micro_batches == 0:
            return
        missing = sums.micro_batches - sums.with_term - sums.nonfinite
        share = 100.0 * sums.with_term / sums.micro_batches
        print(
            f"{PREFIX} HeRA term in {sums.with_term} of {sums.micro_batches} micro-batches ({share:.0f}%)"
            + (f"; {missing} without (text-only or too few image samples)" if missing else "")
            + (
                f"; {sums.nonfinite} skipped as non-finite (check hera_temperature / bf16 overflow)"
                if sums.nonfinite
                else ""
            )
            + ".",
            flush=True,
        )


class HeraSeq2SeqTrainer(HeraTrainer, MethodTrainer, HostTrainer):
    """HeRA's trainer: its step on the trainer base over LLaMA-Factory's trainer, with the base's hooks."""

    def __init__(
        self,
        *args: Any,
        hera_args: HeraArguments,
        hera_prepared: HeraPreparation,
        hera_feature_cache: TeacherFeatureCache,
        recipe_args: RecipeArgs,
        **kwargs: Any,
    ) -> None:
        if hera_args.auto_heads:  # prepare() resolves it; a trainer of no heads would align nothing
            raise ValueError("hera_heads: auto has not been resolved yet")
        # before the teacher loads: same heads on all ranks, each moved by a trainable weight
        check_same_heads_on_every_rank(head_names(hera_args.hera_heads))
        model = kwargs["model"] if "model" in kwargs else args[0]  # Trainer(model, args, ...)
        check_heads_train(model, hera_args.hera_heads, hera_prepared.auto, kwargs.get("finetuning_args"))
        keep_4bit_layout(model)  # for every eval forward: the monitor's and the Trainer's
        contrastive = hera_prepared.contrastive
        super().__init__(
            *args, hera_args=hera_args, hera_feature_cache=hera_feature_cache, hera_queue=contrastive.queue, **kwargs
        )
        probe = hera_prepared.probe
        if probe is not None:
            self.hera_monitor = MonitorCallback(self, hera_args, probe, self.hera_geometry, recipe_args)
        # the start line before the monitor's step-0 point
        self.add_callback(RunSummary(self, hera_args, hera_prepared.counts, contrastive, self.hera_monitor))
        if self.hera_monitor is not None:
            self.add_callback(self.hera_monitor)

    @override
    def before_steps(self) -> None:
        """The probe pairs' teacher features (before the teacher may leave the device), then the teacher's pass."""
        teacher = self.hera_teacher
        if self.hera_monitor is not None:
            self.hera_monitor.prepare_teacher(teacher.model, teacher.image_processor(self.data_collator))
        with sections.section("the teacher's pass before step 1", "teacher", forwards=True):
            teacher.precompute(self.train_dataset, self.data_collator, self.args, self.is_world_process_zero())

    @override
    def after_steps(self) -> None:
        self.hera_teacher.to(self.hera_teacher.device)  # back where load_teacher put the process-wide teacher

    @override
    def save_method_state(self, folder: str, checkpoint: bool) -> None:
        """``hera_state.json``; in a checkpoint with its optimizer, the temperature's own optimizer and this rank's
        queue."""
        if self.args.should_save:
            saved_state.save_state(folder, self.hera_args, self.hera_log_tau)
        if checkpoint and not self.args.save_only_model:
            saved_state.save_optimizer_state(
                folder, self.hera_tau.own_optimizer, self.hera_queue, self.args.process_index, self.args.should_save
            )

    @override
    def load_method_state(self, folder: str) -> None:
        saved_state.load_state(
            folder,
            self.hera_args,
            self.hera_log_tau,
            self.hera_tau.own_optimizer,
            self.hera_queue,
            self.args.process_index,
            self.args.device,
        )


def _from_pil(err: BaseException) -> bool:
    """Whether PIL raised ``err`` (here or in a preprocessing worker, whose traceback text is the cause)."""
    text = "".join(traceback.format_exception(err))
    return f"{os.sep}PIL{os.sep}" in text


# host settings for re-scoring the heads, by the parsed arguments holding them
_RECORDED_HOST_KEYS = (
    ("model", ("model_name_or_path", "adapter_name_or_path", "trust_remote_code")),
    (
        "data",
        (
            "template",
            "dataset",
            "eval_dataset",
            "dataset_dir",
            "media_dir",
            "cutoff_len",
            "enable_thinking",
            "default_system",
        ),
    ),
    ("model", ("image_max_pixels", "image_min_pixels")),
    ("finetuning", ("finetuning_type", "pure_bf16")),
    ("training", ("seed", "output_dir", "bf16", "fp16")),
)


def _write_run_record(output_dir: str, hera_args: HeraArguments, parsed: HostArguments) -> None:
    """``hera_run.json``: the HeRA settings and the host settings needed to re-score the run's heads."""
    host = {
        key: plain(getattr(getattr(parsed, holder), key, None)) for holder, keys in _RECORDED_HOST_KEYS for key in keys
    }
    record = {"stage": "hera", "llamafactory_hera_version": __version__, **hera_args.recipe_keys(), "host": host}
    write_record(Path(output_dir) / HERA_RUN_RECORD, record)


def train(
    hera_args: HeraArguments, host: Any, parsed: HostArguments, callbacks: Any, prepared: HeraPreparation
) -> None:
    model_args, data_args, training_args, finetuning_args, _ = parsed
    rows = prepared.rows
    cache = TeacherFeatureCache(enabled=hera_args.hera_teacher_cache)  # shared by this run's collator and trainer
    collator = type(
        "HeraSFTDataCollator",
        (HeraCollatorMixin, host.collator),
        {
            "hera_image_processor": load_image_processor(hera_args.hera_teacher),
            "hera_feature_cache": cache,
            "hera_image_rows": rows,
        },
    )
    trainer_kwargs = {
        "hera_args": hera_args,
        "hera_prepared": prepared,
        "hera_feature_cache": cache,
        "recipe_args": RecipeArgs(model_args, data_args, finetuning_args),
    }
    if training_args.should_save:
        _write_run_record(training_args.output_dir, hera_args, parsed)

    def get_dataset(template: Any, *args: Any, **tokenizer_module: Any) -> dict[str, Any]:
        module = host.get_dataset(template, *args, **tokenizer_module)  # tokenized; the model loads next
        if not data_args.packing and training_args.process_index == 0:
            check_image_tokens(
                module.get("train_dataset"),
                prepared.aligned,
                rows,
                template,
                tokenizer_module,
                data_args.cutoff_len,
                describe_data(data_args),
            )
        return module

    try:
        host.run(
            collator, HeraSeq2SeqTrainer, *parsed, callbacks, get_dataset=get_dataset, trainer_kwargs=trainer_kwargs
        )
    except OSError as err:  # e.g. PIL's UnidentifiedImageError in the host's preprocessing
        culprit = next((path for path in rows if path in str(err)), None)
        if culprit is None:  # PIL's "Truncated File Read" names no file: the first that does not decode
            found = first_unreadable(rows, describe_data(data_args)) if _from_pil(err) else None
            if found is None:
                raise
            raise RecipeError(f"{found} (LLaMA-Factory's preprocessing: {type(err).__name__}: {err})") from err
        raise RecipeError(
            f"HeRA cannot read {describe_image(culprit, rows)}: {type(err).__name__}: {err}. Fix or remove the file."
        ) from err


def finish(
    hera_args: HeraArguments, host: Any, parsed: HostArguments, prepared: HeraPreparation, trained: None
) -> None:
    training_args = parsed.training
    if parsed.finetuning.plot_loss and training_args.process_index == 0:
        path, missing = plot_training(training_args.output_dir, "hera", TRAINING_PLOT, host.smooth)
        if path is not None:
            print(f"Figure saved at: {path}")
        if path is not None and missing:
            print(line(f"not logged, so not plotted: {', '.join(missing)}"), flush=True)
