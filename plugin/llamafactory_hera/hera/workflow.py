"""A ``stage: hera`` run: LLaMA-Factory's SFT workflow with HeRA's collator and trainer, called by the stage patch
in place of ``run_sft`` with ``host`` (:class:`llamafactory_hera_patches.stage.SFTWorkflow`), and its start line and
end count (:class:`RunSummary`), so a run that trains less HeRA than it seems to is never silent.
"""

from __future__ import annotations

import os
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from llamafactory_hera import __version__
from llamafactory_hera.hera.collator import HeraCollatorMixin, describe_image
from llamafactory_hera.hera.config import HERA_RUN_RECORD, TRAINING_PLOT, HeraArguments
from llamafactory_hera.hera.image_tokens import check_image_tokens
from llamafactory_hera.hera.loss import TAU_MAX, TAU_MIN
from llamafactory_hera.hera.monitor import MonitorCallback, probe_set
from llamafactory_hera.hera.preparation_checks import (
    ContrastiveGeometry,
    check_contrastive_geometry,
    check_heads_train,
    check_image_rows,
    check_same_heads_on_every_rank,
    contrastive_geometry,
    count_image_rows,
    queue_cap_line,
)
from llamafactory_hera.hera.selection.auto import resolve_auto_heads
from llamafactory_hera.hera.selection.select import scoring_dtype
from llamafactory_hera.hera.teacher import load_image_processor
from llamafactory_hera.hera.teacher_cache import TeacherFeatureCache
from llamafactory_hera.hera.trainer import HeraTrainer
from llamafactory_hera.log import say, say_again_on_board
from llamafactory_hera.plots.training import plot_training
from llamafactory_hera.recipe.dataset_info import describe_data, first_unreadable, image_rows
from llamafactory_hera.runtime.errors import RecipeError
from llamafactory_hera.runtime.run_record import plain, write_record
from llamafactory_hera.training import sections, watchdog
from llamafactory_hera.training.checkpoints import RestoresCheckpointWeights, WholeCheckpoints
from llamafactory_hera.training.eval_forward import keep_4bit_layout
from llamafactory_hera_patches.data.media_warnings import media_warnings_held
from llamafactory_hera_patches.data.templates import image_placeholder
from llamafactory_hera_patches.tools.model_data import (
    RecipeArgs,
    holds_out_by_val_size,
    load_aligned_rows,
    training_rows,
)

PREFIX = "[llamafactory-hera]"


class RunSummary(TrainerCallback):
    """Prints the start line when training begins (main process), after ``Trainer.train`` re-enabled gradient
    checkpointing, so that its checkpointing part says what the steps run under, and before the alignment monitor's
    step-0 point; at the end, the count of micro-batches with a HeRA term. ``data_counts``:
    ``preparation_checks.ImageRowCounts`` or None (streaming); ``contrastive``:
    ``preparation_checks.ContrastiveGeometry``; ``monitor``: the alignment monitor's callback or None."""

    def __init__(
        self, trainer: Any, hera_args: HeraArguments, data_counts: Any, contrastive: Any, monitor: Any = None
    ) -> None:
        self.trainer, self.hera_args, self.data_counts = trainer, hera_args, data_counts
        self.contrastive, self.monitor = contrastive, monitor
        self.said = False  # once: auto_find_batch_size begins training again after an out-of-memory error

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:  # noqa: D102
        if state.is_world_process_zero and not self.said:
            self.said = True
            print(self.start_line(), flush=True)

    def start_line(self) -> str:
        """The run's HeRA settings in one line (heads, teacher, k, lambda, temperature, pooling, sets, data, monitor,
        gradient checkpointing per decoder layer)."""
        args, trainer, geometry = self.hera_args, self.trainer, self.contrastive
        temperature_lr, processes = trainer.hera_temperature_lr, trainer.args.world_size
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
            f"{PREFIX} HeRA: heads [{', '.join(args.hera_heads)}]; teacher {args.hera_teacher} "
            f"({args.hera_teacher_feature}); k {args.hera_k}; lambda {args.hera_lambda}; {temperature}; "
            f"pooling {args.hera_pooling}; {gather}; contrastive set up to {geometry.largest} samples; {queue}; "
            f"precompute {args.hera_teacher_precompute} -> {precompute_on}; {data}; {monitor_line}; "
            f"{checkpointing_line}"
        )

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """The steps after the last log read (their checks, this rank's counts), then the micro-batches with a HeRA
        term over the run (this process)."""
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


def _hera_classes(
    host: Any,
    hera_args: HeraArguments,
    image_rows: dict[str, int],
    data_counts: Any,
    contrastive: ContrastiveGeometry,
    probe: Any,
    recipe_args: Any,
    auto: bool,
) -> tuple[type, type]:
    """The run's collator and trainer classes: HeRA's step (``HeraTrainer``) with what runs around it wired here:
    the checks before the first step, the start and end lines, the alignment monitor."""
    cache = TeacherFeatureCache(enabled=hera_args.hera_teacher_cache)  # shared by this run's collator and trainer
    collator = type(
        "HeraSFTDataCollator",
        (HeraCollatorMixin, host.collator),
        {
            "hera_image_processor": load_image_processor(hera_args.hera_teacher),
            "hera_feature_cache": cache,
            "hera_image_rows": image_rows,
        },
    )

    class HeraSeq2SeqTrainer(HeraTrainer, WholeCheckpoints, RestoresCheckpointWeights, host.trainer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            # before the trainer loads its teacher: the same heads on every rank, and heads that a trainable weight
            # moves (else only the temperature would train)
            check_same_heads_on_every_rank(list(hera_args.hera_heads))
            model = kwargs["model"] if "model" in kwargs else args[0]  # Trainer(model, args, ...)
            check_heads_train(model, hera_args.head_refs, auto, kwargs.get("finetuning_args"))
            keep_4bit_layout(model)  # through every eval forward: the monitor's, the Trainer's evaluation steps
            super().__init__(
                *args, hera_args=hera_args, hera_feature_cache=cache, hera_queue=contrastive.queue, **kwargs
            )
            self.hera_monitor = (
                None if probe is None else MonitorCallback(self, hera_args, probe, self.hera_geometry, recipe_args)
            )
            # the start line before the monitor's step-0 point, both when training begins
            self.add_callback(RunSummary(self, hera_args, data_counts, contrastive, self.hera_monitor))
            if self.hera_monitor is not None:
                self.add_callback(self.hera_monitor)

        def train(self, *args: Any, **kwargs: Any) -> Any:
            if self.hera_monitor is not None:  # the probe pairs' teacher features, before the teacher may leave
                self.hera_monitor.prepare_teacher(
                    self.hera_teacher.model,  # the device (the precompute's pass)
                    self.hera_teacher.image_processor(self.data_collator),
                )
            return super().train(*args, **kwargs)

        def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
            if self.hera_monitor is not None and "loss" in logs:  # the monitor's point joins its step's log
                self.hera_monitor.merge(logs, self.state.global_step)
            super().log(logs, *args, **kwargs)

    return collator, HeraSeq2SeqTrainer


def _checked_image_rows(
    model_args: Any, data_args: Any, finetuning_args: Any, training_args: Any
) -> tuple[dict[str, int], Any, Any]:
    """(image path -> training-data row, the counts of the rows that train, the aligned rows), after checking every
    image file exists and that the training rows have images at all, before LLaMA-Factory's preprocessing fails on a
    missing file with a bare OSError. The counts leave out ``val_size``'s validation rows (LLaMA-Factory's split with
    the run's seed, of the rows before its preprocessing). Streaming datasets are not scanned (counts and rows None)."""
    if getattr(data_args, "streaming", False):
        return {}, None, None

    # Main process first, as LLaMA-Factory loads a dataset: the others then read the datasets cache it wrote instead
    # of aligning with preprocessing_num_workers processes each (and checking every image) at the same time.
    # Only the main process stats the image files (the others wait for it, then map paths to rows without the
    # file system: 8 ranks per node checking every image of a 665k-row dataset at once is what this avoids).
    local = not getattr(data_args, "data_shared_file_system", False)
    main = (training_args.local_process_index if local else training_args.process_index) == 0
    with (
        training_args.main_process_first(desc="align the dataset and check its images", local=local),
        media_warnings_held(),
    ):  # a missing file is named alone, not below the converter's line per image
        recipe = RecipeArgs(model_args, data_args, finetuning_args)
        aligned = load_aligned_rows(recipe, training_args.seed, training_args=training_args)
        counts = count_image_rows(training_rows(recipe, training_args.seed, aligned))
        check_image_rows(
            counts,
            data_args.dataset,
            f" that train (val_size: {data_args.val_size} holds the others out)"
            if holds_out_by_val_size(data_args)
            else "",
        )
        return (
            image_rows(
                aligned,
                column="_images",
                check_files=main,
                placeholder=image_placeholder(),
                data=describe_data(data_args),
            ),
            counts,
            aligned,
        )


def _from_pil(err: BaseException) -> bool:
    """Whether PIL raised ``err`` (in this process, or in a preprocessing worker: its traceback text is the cause)."""
    text = "".join(traceback.format_exception(err))
    return f"{os.sep}PIL{os.sep}" in text


def _contrastive(hera_args: HeraArguments, counts: Any, data_args: Any, training_args: Any) -> ContrastiveGeometry:
    """The run's contrastive sets (the trainer's queue among them). Refuse a run whose sets can never hold hera_k + 1
    distinct images of the rows that train; say when those images cap the queue."""
    geometry = contrastive_geometry(
        hera_args,
        training_args.per_device_train_batch_size,
        training_args.world_size,
        None if counts is None else counts.distinct_images,
    )
    if counts is None:  # streaming: the sizes alone were checked before loading (hera/raw_checks.py)
        return geometry
    names = ", ".join(data_args.dataset) if isinstance(data_args.dataset, list) else data_args.dataset
    limit = f", max_samples: {data_args.max_samples}" if data_args.max_samples is not None else ""
    more = "another dataset, or a larger max_samples"
    if holds_out_by_val_size(data_args):  # its validation rows do not train
        limit += f", without val_size: {data_args.val_size}'s validation rows"
        more = "another dataset, a larger max_samples, or a smaller val_size"
    check_contrastive_geometry(geometry, hera_args, f"the training data (dataset: {names}{limit})", more)
    line = queue_cap_line(geometry, hera_args)
    if line and training_args.process_index == 0:
        say(line)
    return geometry


def _write_run_record(
    output_dir: str, hera_args: HeraArguments, host_keys: tuple[tuple[Any, tuple[str, ...]], ...]
) -> None:
    """``hera_run.json``: the HeRA settings and the host settings needed to re-score the run's heads."""
    record = {
        "stage": "hera",
        "llamafactory_hera_version": __version__,
        **asdict(hera_args),
        "host": {key: plain(getattr(holder, key, None)) for holder, keys in host_keys for key in keys},
    }
    write_record(Path(output_dir) / HERA_RUN_RECORD, record)


def run_hera(
    host: Any,
    model_args: Any,
    data_args: Any,
    training_args: Any,
    finetuning_args: Any,
    generating_args: Any,
    callbacks: Any,
    hera_args: HeraArguments,
) -> None:
    """Train (and evaluate) as ``run_sft`` does, with HeRA's collator and trainer; then HeRA's curves."""
    with watchdog.watching(training_args, hera_args.hera_watchdog_timeout):
        _run_hera(host, model_args, data_args, training_args, finetuning_args, generating_args, callbacks, hera_args)


def _run_hera(
    host: Any,
    model_args: Any,
    data_args: Any,
    training_args: Any,
    finetuning_args: Any,
    generating_args: Any,
    callbacks: Any,
    hera_args: HeraArguments,
) -> None:
    say_again_on_board()  # LlamaBoard's log box lost the recipe checks' lines (a host warning)
    # the data checks first: an image-less dataset is named as such, not as too few pairs to select heads from
    rows, counts, aligned = _checked_image_rows(model_args, data_args, finetuning_args, training_args)
    contrastive = _contrastive(hera_args, counts, data_args, training_args)
    auto = hera_args.auto_heads
    if auto:
        precision = {
            "bf16": training_args.bf16,
            "fp16": training_args.fp16,
            "pure_bf16": finetuning_args.pure_bf16,
            "model_name_or_path": model_args.model_name_or_path,
        }
        # rank 0 scores the heads (each forward is progress) while the others wait for it in a collective
        kind = "selection" if training_args.process_index == 0 else "wait"
        with sections.section("head selection", kind, forwards=True):
            hera_args.hera_heads = resolve_auto_heads(
                RecipeArgs(model_args, data_args, finetuning_args),
                hera_args,
                training_args.seed,
                str(training_args.device),
                training_args.output_dir,
                training_args.process_index == 0,
                dtype=scoring_dtype(precision),
            )

    recipe_args = RecipeArgs(model_args, data_args, finetuning_args)
    probe = probe_set(hera_args, recipe_args, aligned, training_args.seed)  # before the model loads
    collator, trainer = _hera_classes(host, hera_args, rows, counts, contrastive, probe, recipe_args, auto)
    if training_args.should_save:
        _write_run_record(
            training_args.output_dir,
            hera_args,
            (
                (model_args, ("model_name_or_path", "adapter_name_or_path", "trust_remote_code")),
                (
                    data_args,
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
                (model_args, ("image_max_pixels", "image_min_pixels")),
                (finetuning_args, ("finetuning_type", "pure_bf16")),
                (training_args, ("seed", "output_dir", "bf16", "fp16")),
            ),
        )

    def get_dataset(template: Any, *args: Any, **tokenizer_module: Any) -> dict[str, Any]:
        module = host.get_dataset(template, *args, **tokenizer_module)  # tokenized; the model loads next
        if not data_args.packing and training_args.process_index == 0:
            check_image_tokens(
                module.get("train_dataset"),
                aligned,
                rows,
                template,
                tokenizer_module,
                data_args.cutoff_len,
                describe_data(data_args),
            )
        return module

    try:
        host.run(
            collator,
            trainer,
            model_args,
            data_args,
            training_args,
            finetuning_args,
            generating_args,
            callbacks,
            get_dataset=get_dataset,
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
    if finetuning_args.plot_loss and training_args.process_index == 0:
        path, missing = plot_training(training_args.output_dir, "hera", TRAINING_PLOT, host.smooth)
        if path is not None:
            print(f"Figure saved at: {path}")
        if path is not None and missing:
            print(f"[llamafactory-hera] not logged, so not plotted: {', '.join(missing)}", flush=True)
