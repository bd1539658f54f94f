"""Registers every declared method's stage (``stage: hera``, ...) in LLaMA-Factory's trainer entry point.

A method's stage maps to its host stage (``sft``) before LLaMA-Factory parses the arguments, so every host check, the
data pipeline and the web UI treat the run as SFT. Nothing here names a method.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import llamafactory.extras.ploting as ploting
import llamafactory.hparams as hparams
import llamafactory.train.callbacks as callbacks
import llamafactory.train.sft.workflow as sft_workflow

from llamafactory_hera.runtime import agent_notes, output_dir, run_claim, run_record, shared_output
from llamafactory_hera.runtime.parsed_arguments import HostArguments
from llamafactory_hera.runtime.raw_recipe import RawRecipe, raw_value
from llamafactory_hera.runtime.registry import registered_methods

from . import logging as log_patch
from . import ray_driver
from .engines import fsdp_adapter, fsdp_loading
from .engines.kv_sharing import reentrant_kv_note
from .guard import require, warn_if_unchecked
from .recipe import recipe_file
from .recipe.arguments import keys_of, split_args
from .recipe.raw_checks import check_host_stage, checked_run, quiet_transformers

_TUNER_NAMES = ("_training_function", "_ray_training_function", "get_train_args", "run_sft")
# bitsandbytes' CPU backend logs this at import without the ``kernels`` package; PEFT imports it in every LoRA run,
# yet the kernel serves 4-bit weights only
_BITSANDBYTES_CPU = logging.getLogger("bitsandbytes.backends.cpu.ops")
_KERNEL_NOTE = "Failed to load CPU gemm_4bit_forward"
_WORKFLOW_NAMES = ("run_sft", "get_dataset", "SFTDataCollatorWith4DAttentionMask", "CustomSeq2SeqTrainer")


def _check_shapes(tuner: ModuleType) -> None:
    require(tuner, _TUNER_NAMES, "stage")
    require(hparams, ("read_args", "get_train_args", "FinetuningArguments"), "stage")
    require(sft_workflow, _WORKFLOW_NAMES, "stage")
    require(ploting, ("smooth",), "stage")
    require(callbacks, ("LogCallback",), "logging")
    require(callbacks.LogCallback, ("on_log", "_write_log"), "logging")
    for method in registered_methods():
        if method.host_stage != "sft":
            raise NotImplementedError(
                f"llamafactory-hera: method '{method.stage}' extends stage "
                f"'{method.host_stage}'; the stage patch offers only the SFT workflow."
            )


@contextlib.contextmanager
def _swapped(module: ModuleType, **replacements: Any) -> Iterator[None]:
    saved = {name: getattr(module, name) for name in replacements}
    for name, value in replacements.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


class SFTWorkflow:
    """What a method's run gets of LLaMA-Factory's SFT workflow: the stock collator to subclass, the host's
    ``get_dataset`` (data tokenized before the model loads), the loss curves' smoothing, and :meth:`run`: ``run_sft``
    whole with collator, trainer (built with ``trainer_kwargs``) and ``get_dataset`` swapped in."""

    def __init__(self) -> None:
        self.collator: type = sft_workflow.SFTDataCollatorWith4DAttentionMask
        self.get_dataset: Callable[..., Any] = sft_workflow.get_dataset
        self.smooth = ploting.smooth

    def run(
        self,
        collator: type,
        trainer: type,
        *args: Any,
        get_dataset: Callable[..., Any] | None = None,
        trainer_kwargs: dict[str, Any] | None = None,
    ) -> None:
        built = functools.partial(trainer, **trainer_kwargs) if trainer_kwargs else trainer
        replaced = {"SFTDataCollatorWith4DAttentionMask": collator, "CustomSeq2SeqTrainer": built}
        if get_dataset is not None:
            replaced["get_dataset"] = get_dataset
        # run_sft reads these as module globals, not arguments
        with _swapped(sft_workflow, **replaced):
            sft_workflow.run_sft(*args)


def apply(tuner: ModuleType) -> None:
    if getattr(tuner, "_llamafactory_hera_patched", False):
        return
    _check_shapes(tuner)
    warn_if_unchecked()
    recipe_file.apply(tuner)  # run_exp's read of the recipe file: its mistakes named
    log_patch.apply(callbacks)
    tuner._training_function = functools.partial(training_function, tuner, tuner._training_function)
    # USE_RAY=1: the driver records a run whose workers Ray ended
    tuner._ray_training_function = functools.partial(ray_driver.ray_training_function, tuner._ray_training_function)
    tuner._llamafactory_hera_patched = True


def training_function(
    tuner: ModuleType, host_training: Callable[[dict[str, Any]], None], config: dict[str, Any]
) -> None:
    """The host's ``_training_function`` (``config``: its ``args``, ``callbacks``) run as :func:`run_method` or
    :func:`run_host_stage`."""
    raw = hparams.read_args(config.get("args"))
    host_args, method_raw, method = split_args(raw)
    config = {**config, "args": host_args}
    if method is None and not method_raw:  # a plain recipe: the host's run alone;
        return run_host_stage(tuner, host_training, config, method_raw)  # nothing of ours left in output_dir if killed
    # one live run per output_dir: claimed before anything reads or writes it
    with run_claim.claimed(host_args, str(raw_value(raw, "stage") or "sft")):
        if method is None:  # a method's baseline twin: its recipe holds the method's keys
            return run_host_stage(tuner, host_training, config, method_raw)
        return run_method(tuner, host_training, config, method, method_raw)


def run_method(
    tuner: ModuleType, host_training: Callable[[dict[str, Any]], None], config: dict[str, Any], method: Any, raw: dict
) -> None:
    """A method's run (output_dir claimed), from the recipe to the record, in order.

    1. checks: a finished run refused (before the parse would resume it); the checks before the parse, nothing
       loaded (:func:`checked_run`, which builds the run from the method's keys);
    2. parse: LLaMA-Factory's, then the run's parsed checks; the host's steps: the bitsandbytes CPU note held back
       unless the run quantizes, the shared-output probe, the overwrite (an earlier run's files moved aside); the
       run's record: running;
    3. to 5. prepare, train, finish: the run's (``MethodRun.in_place_of_sft``), where LLaMA-Factory's
       ``_training_function`` calls ``run_sft``;
    then the record: finished, stopped or failed. The save signal is noted from the parse to the last step.
    """
    host_args = config["args"]
    output_dir.refuse_finished(host_args)
    run = checked_run(method, _own_keys(method, raw), host_args)
    with run.noting_save_signal():
        record = None
        try:
            parsed = hparams.get_train_args(host_args)
            with quiet_transformers():
                run.check_parsed(HostArguments(*parsed))
            _hold_bitsandbytes_note(host_args)
            _refuse_unshared(parsed)
            output_dir.clear_for_overwrite(host_args, HostArguments(*parsed).training)
            record = _started(parsed, method.stage, marks=True)
            in_place_of_sft = functools.partial(_in_place_of_sft, run, SFTWorkflow())
            with _swapped(tuner, get_train_args=functools.partial(_parsed, parsed), run_sft=in_place_of_sft):
                host_training(config)  # callbacks, then the run's phases 3 to 5
        except BaseException as error:
            _ended(record, error, method.records)  # failed (or stopped on the save signal)
            raise
        finally:
            _BITSANDBYTES_CPU.removeFilter(_unquantized_note)
        _ended(record, None)  # finished


def run_host_stage(
    tuner: ModuleType, host_training: Callable[[dict[str, Any]], None], config: dict[str, Any], raw: dict
) -> None:
    """A host stage's run: stage checked, ignored method keys (``raw``) warned about. Recorded only as a method's
    baseline twin (``raw`` set): a plain recipe's output_dir holds only what LLaMA-Factory writes."""
    host_args = config["args"]
    output_dir.refuse_finished(host_args)  # before the parse would resume it
    check_host_stage(host_args, os.environ)
    for other in registered_methods():
        ignored = sorted(key for key in raw if key.startswith(other.prefix))
        if ignored:
            warnings.warn(
                f"llamafactory-hera: ignoring {', '.join(ignored)} because the stage is not "
                f"'{other.stage}' (this is how a recipe's baseline twin runs).",
                stacklevel=3,
            )
    stage = str(raw_value(host_args, "stage") or "sft")
    record = None
    try:
        parsed = hparams.get_train_args(host_args)
        _hold_bitsandbytes_note(host_args)
        if raw:  # recorded
            _refuse_unshared(parsed)
        output_dir.clear_for_overwrite(host_args, HostArguments(*parsed).training)
        _say_stock_notes(parsed, stage)
        record = _started(parsed, stage, marks=False) if raw else None
        with _swapped(tuner, get_train_args=functools.partial(_parsed, parsed)):
            host_training(config)
    except BaseException as error:
        _ended(record, error, ())
        raise
    finally:
        _BITSANDBYTES_CPU.removeFilter(_unquantized_note)
    _ended(record, None)


def _own_keys(method: Any, raw: dict[str, Any]) -> dict[str, Any]:
    own, ignored = keys_of(method, raw)
    if ignored:
        warnings.warn(
            f"llamafactory-hera: ignoring {', '.join(ignored)} because the stage is '{method.stage}'.", stacklevel=3
        )
    return own


def _hold_bitsandbytes_note(host_args: RawRecipe) -> None:
    """The 4-bit CPU kernel's note held back (until the run ends) unless bitsandbytes quantizes."""
    if "bitsandbytes" not in sys.modules and not fsdp_loading.loads_bitsandbytes_weights(host_args):
        _BITSANDBYTES_CPU.addFilter(_unquantized_note)


def _refuse_unshared(parsed: tuple[Any, ...]) -> None:
    """A recorded training run's folder checked as one every node sees (every node reads checkpoints and record)."""
    training_args = HostArguments(*parsed).training
    if getattr(training_args, "do_train", True):
        shared_output.refuse_unshared(training_args)


def _say_stock_notes(parsed: tuple[Any, ...], stage: str) -> None:
    """A stock stage's notes (main process): the host's gradient and what FSDP saves of it."""
    host = HostArguments(*parsed)
    training_args = host.training
    if getattr(training_args, "process_index", 0) != 0:
        return
    with quiet_transformers():
        note = reentrant_kv_note(host.model, training_args)
    training = getattr(training_args, "do_train", True)
    for line in (note, training and fsdp_adapter.unsaved_refusal(stage, os.environ, note=True)):
        if line:
            print(line, flush=True)


def _parsed(parsed: tuple[Any, ...], args: Any = None) -> tuple[Any, ...]:
    return parsed


def _in_place_of_sft(
    run: Any,
    host: SFTWorkflow,
    model_args: Any,
    data_args: Any,
    training_args: Any,
    finetuning_args: Any,
    generating_args: Any,
    callbacks: Any = None,
) -> None:
    """``run_sft``'s stand-in: the run's phases 3 to 5."""
    run.in_place_of_sft(
        host, HostArguments(model_args, data_args, training_args, finetuning_args, generating_args), callbacks
    )


def _started(parsed: tuple[Any, ...], stage: str, marks: bool) -> Path | None:
    """Write the run record ``running``: global main only (save_on_each_node has a main per node; one writer per
    folder), training runs only (a do_predict run must not replace it). ``marks``: a method marks its checkpoints."""
    host = HostArguments(*parsed)
    training_args = host.training
    main = getattr(training_args, "process_index", 0) == 0
    if not (main and getattr(training_args, "do_train", True) and getattr(training_args, "output_dir", None)):
        return None
    keys = run_record.loading_keys(host.model, host.data, host.finetuning, training_args)
    path = run_record.write_started(training_args.output_dir, stage, keys, marks=marks)
    agent_notes.note(agent_notes.RECORD, str(path.resolve()))  # the launcher ends it where the ranks cannot
    return path


def _ended(record: Path | None, error: BaseException | None, method_records: tuple[str, ...] = ()) -> None:
    """Mark the record ended (None: nothing recorded; an earlier run's record is left as it was)."""
    if record is not None:
        run_record.write_ended(record, error, method_records)


def _unquantized_note(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_KERNEL_NOTE)
