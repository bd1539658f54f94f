"""Registers every declared method's stage (``stage: hera``, ...) in LLaMA-Factory's trainer entry point.

Checked on LLaMA-Factory 0.9.5; the host names relied on (module globals looked up at call time) are
:func:`_check_shapes`'s, verified before anything is patched. A method's stage is mapped to its host stage (``sft``)
before LLaMA-Factory parses the arguments, so every host check, the data pipeline and the web UI treat the run as
SFT. :func:`run_method` runs a method's stage, its steps in order: the claim of ``output_dir``, a finished folder
refused, the run's raw checks, its save signal noted, LLaMA-Factory's parse and the run's parsed checks, the run's
record, LLaMA-Factory's training function with the run's phases in place of ``run_sft``, and the record's end. What a
method declares is the plugin's ``Method``, registered with :mod:`llamafactory_hera.runtime.registry`; nothing here
names one.
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

from llamafactory_hera.runtime import output_dir, run_claim, run_record, shared_output, stop_signal
from llamafactory_hera.runtime.raw_recipe import RawRecipe, raw_value
from llamafactory_hera.runtime.registry import registered_methods
from llamafactory_hera.runtime.stage_run import HostArguments

from . import logging as log_patch
from .engines import fsdp_adapter, fsdp_loading
from .engines.kv_sharing import reentrant_kv_note
from .guard import require, warn_if_unchecked
from .recipe import recipe_file
from .recipe.arguments import keys_of, split_args
from .recipe.raw_checks import check_host_stage, quiet_transformers, start_run

_TUNER_NAMES = ("_training_function", "get_train_args", "run_sft")
# bitsandbytes' CPU backend logs this at its import where the ``kernels`` package is missing; PEFT imports bitsandbytes
# in every LoRA run where it is installed, and the kernel serves 4-bit weights only
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
    """Module globals replaced for the block (restored even on error): LLaMA-Factory calls them by these names."""
    saved = {name: getattr(module, name) for name in replacements}
    for name, value in replacements.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


class SFTWorkflow:
    """What a method's run gets of LLaMA-Factory's SFT workflow (0.9.5).

    ``collator`` / ``trainer``: the stock ``SFTDataCollatorWith4DAttentionMask`` / ``CustomSeq2SeqTrainer``
    (for the method to subclass); ``run(collator, trainer, model_args, ..., get_dataset=None)``: ``run_sft`` whole
    with those two (and, when given, its ``get_dataset(template, model_args, data_args, training_args, stage,
    **tokenizer_module) -> {"train_dataset": ..., "eval_dataset": ...}``) replaced for its duration (the host's is
    ``get_dataset``: the data tokenized, before the model loads); ``smooth``: the loss curves' smoothing
    (``extras.ploting.smooth``).
    """

    def __init__(self) -> None:
        self.collator: type = sft_workflow.SFTDataCollatorWith4DAttentionMask
        self.trainer: type = sft_workflow.CustomSeq2SeqTrainer
        self.get_dataset: Callable[..., Any] = sft_workflow.get_dataset
        self.smooth = ploting.smooth

    def run(self, collator: type, trainer: type, *args: Any, get_dataset: Callable[..., Any] | None = None) -> None:
        replaced = {"SFTDataCollatorWith4DAttentionMask": collator, "CustomSeq2SeqTrainer": trainer}
        if get_dataset is not None:
            replaced["get_dataset"] = get_dataset
        # run_sft reads them as its module's globals: no argument of its takes them
        with _swapped(sft_workflow, **replaced):
            sft_workflow.run_sft(*args)


def apply(tuner: ModuleType) -> None:
    """Patch ``llamafactory.train.tuner`` (all or nothing)."""
    if getattr(tuner, "_llamafactory_hera_patched", False):
        return
    _check_shapes(tuner)
    warn_if_unchecked()
    recipe_file.apply(tuner)  # run_exp's read of the recipe file: its mistakes named
    log_patch.apply(callbacks)
    tuner._training_function = functools.partial(training_function, tuner, tuner._training_function)
    tuner._llamafactory_hera_patched = True


def training_function(
    tuner: ModuleType, host_training: Callable[[dict[str, Any]], None], config: dict[str, Any]
) -> None:
    """LLaMA-Factory's ``_training_function`` (``host_training``; ``config``: its ``args`` and ``callbacks``) with the
    plugin's steps around it: a method's stage (:func:`run_method`), or LLaMA-Factory's (:func:`run_host_stage`)."""
    raw = hparams.read_args(config.get("args"))
    host_args, method_raw, method = split_args(raw)
    config = {**config, "args": host_args}
    if method is None and not method_raw:  # a plain recipe: LLaMA-Factory's run alone, nothing of the plugin's
        return run_host_stage(tuner, host_training, config, method_raw)  # left in output_dir when it is killed
    # one live run per output_dir: claimed before anything else reads or writes the folder
    with run_claim.claimed(host_args, str(raw_value(raw, "stage") or "sft")):
        if method is None:  # a method's baseline twin: its recipe holds the method's keys
            return run_host_stage(tuner, host_training, config, method_raw)
        return run_method(tuner, host_training, config, method, method_raw)


def run_method(
    tuner: ModuleType, host_training: Callable[[dict[str, Any]], None], config: dict[str, Any], method: Any, raw: dict
) -> None:
    """A plugin stage's run, claimed: its steps, in order. ``raw``: every method's keys of the recipe."""
    host_args = config["args"]
    output_dir.refuse_finished(host_args)  # a finished run's folder, before the parse would resume it
    run = start_run(method, _own_keys(method, raw), host_args)  # the run's raw checks: nothing loaded
    controls = run.controls
    # the save signal, noted through the parse, the load, the passes before step 1 and the steps
    with stop_signal.noting(controls.save_signal, key=controls.save_signal_key):
        record = None
        try:
            parsed = _parse(host_args, method.stage, run, recorded=True)  # then the run's parsed checks
            record = _started(parsed, method.stage, marks=True)  # the run's record: running
            in_place_of_sft = functools.partial(_run_in_place_of_sft, run, SFTWorkflow())
            with _swapped(tuner, get_train_args=functools.partial(_parsed, parsed), run_sft=in_place_of_sft):
                host_training(config)  # LLaMA-Factory's training function: callbacks, the run's phases 3 to 5
        except BaseException as error:
            _ended(record, error, method.records)  # failed (or stopped on the save signal)
            raise
        finally:
            _BITSANDBYTES_CPU.removeFilter(_unquantized_note)
        _ended(record, None)  # finished


def run_host_stage(
    tuner: ModuleType, host_training: Callable[[dict[str, Any]], None], config: dict[str, Any], raw: dict
) -> None:
    """A LLaMA-Factory stage's run: its stage checked, the methods' keys (``raw``) it ignores said; recorded only as a
    method's baseline twin (its recipe holds a method's keys): a plain recipe's output_dir holds what LLaMA-Factory
    writes, nothing more."""
    host_args = config["args"]
    output_dir.refuse_finished(host_args)  # a finished run's folder, before the parse would resume it
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
        parsed = _parse(host_args, stage, None, recorded=bool(raw))
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
    """``method``'s keys of ``raw``; another method's are said to be ignored."""
    own, ignored = keys_of(method, raw)
    if ignored:
        warnings.warn(
            f"llamafactory-hera: ignoring {', '.join(ignored)} because the stage is '{method.stage}'.", stacklevel=3
        )
    return own


def _parse(host_args: RawRecipe, stage: str, run: Any, recorded: bool) -> tuple[Any, ...]:
    """LLaMA-Factory's parse of ``host_args``, then the ``run``'s parsed checks (None: a host stage's notes), an earlier
    run's files moved aside under ``overwrite_output_dir`` (:mod:`llamafactory_hera.runtime.output_dir`; on several
    nodes, first, that they share it: :mod:`llamafactory_hera.runtime.shared_output`, where the run is ``recorded``),
    bitsandbytes' 4-bit CPU kernel note held back unless bitsandbytes quantizes the model."""
    parsed = hparams.get_train_args(host_args)
    host = HostArguments(*parsed)
    if run is not None:
        with quiet_transformers():
            run.check_parsed(host)
    if "bitsandbytes" not in sys.modules and not fsdp_loading.loads_bitsandbytes_weights(host_args):
        _BITSANDBYTES_CPU.addFilter(_unquantized_note)  # said only where a run quantizes
    training_args = host.training
    main = getattr(training_args, "process_index", 0) == 0
    training = getattr(training_args, "do_train", True)
    if recorded and training:  # every node reads its checkpoints and record: one folder they all see
        shared_output.refuse_unshared(training_args)
    output_dir.clear_for_overwrite(host_args, training_args)
    if run is None and main:  # a stock stage: the host's gradient, what FSDP saves of it
        with quiet_transformers():
            note = reentrant_kv_note(host.model, training_args)
        for line in (note, training and fsdp_adapter.unsaved_refusal(stage, os.environ, note=True)):
            if line:
                print(line, flush=True)
    return parsed


def _parsed(parsed: tuple[Any, ...], args: Any = None) -> tuple[Any, ...]:
    """LLaMA-Factory's ``get_train_args`` inside the training function: the parse the stage made."""
    return parsed


def _run_in_place_of_sft(
    run: Any,
    host: SFTWorkflow,
    model_args: Any,
    data_args: Any,
    training_args: Any,
    finetuning_args: Any,
    generating_args: Any,
    callbacks: Any = None,
) -> None:
    """What LLaMA-Factory's training function calls as ``run_sft``: the run's phases 3 to 5."""
    run.run(host, HostArguments(model_args, data_args, training_args, finetuning_args, generating_args), callbacks)


def _started(parsed: tuple[Any, ...], stage: str, marks: bool) -> Path | None:
    """The run's :mod:`llamafactory_hera.runtime.run_record`, written ``running`` by the one global main process
    (save_on_each_node makes a main per node: one writer per folder), for a training run only (a do_predict run into
    the training folder must not replace its record); ``marks``: a method's stage, which marks its checkpoints."""
    host = HostArguments(*parsed)
    training_args = host.training
    main = getattr(training_args, "process_index", 0) == 0
    if not (main and getattr(training_args, "do_train", True) and getattr(training_args, "output_dir", None)):
        return None
    keys = run_record.loading_keys(host.model, host.data, host.finetuning, training_args)
    return run_record.write_started(training_args.output_dir, stage, keys, marks=marks)


def _ended(record: Path | None, error: BaseException | None, method_records: tuple[str, ...] = ()) -> None:
    """The record marked ``finished``, ``stopped`` or ``failed`` (then the method's own ``method_records`` too); a
    recipe refused by a check recorded nothing (an earlier run's record in ``output_dir`` is left as it was)."""
    if record is not None:
        run_record.write_ended(record, error, method_records)


def _unquantized_note(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_KERNEL_NOTE)
