"""Registers every declared method's stage (``stage: hera``, ...) in LLaMA-Factory's trainer entry point.

Checked on LLaMA-Factory 0.9.5; the host names relied on (module globals looked up at call time) are
:func:`_check_shapes`'s, verified before anything is patched. A method's stage is mapped to its host stage (``sft``)
before LLaMA-Factory parses the arguments, so every host check, the data pipeline and the web UI treat the run as
SFT; the method's checks run on the raw and the parsed arguments, and its ``run`` replaces ``run_sft`` with
:class:`SFTWorkflow`. A stage that is neither a method's nor the host's (``FinetuningArguments.stage``'s ``Literal``)
is refused before parsing, with the closest name. What a method declares is the plugin's ``Method``, registered with
:mod:`.registry`; nothing here names one.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from types import ModuleType
from typing import Any

from transformers.utils import logging as transformers_logging

from llamafactory_hera.runtime import output_dir, run_claim, run_record, shared_output, stop_signal
from llamafactory_hera.runtime.errors import RecipeError
from llamafactory_hera.runtime.raw_recipe import raw_value, truthy
from llamafactory_hera.runtime.registry import registered_methods

from . import backends
from . import logging as log_patch
from .data.templates import host_stages
from .engines import fsdp_adapter, fsdp_loading
from .engines.kv_sharing import reentrant_kv_note
from .guard import require, warn_if_unchecked
from .recipe import recipe_file
from .recipe.arguments import keys_of, split_args

_TUNER_NAMES = ("_training_function", "get_train_args", "run_sft")
# bitsandbytes' CPU backend logs this at its import where the ``kernels`` package is missing; PEFT imports bitsandbytes
# in every LoRA run where it is installed, and the kernel serves 4-bit weights only
_BITSANDBYTES_CPU = logging.getLogger("bitsandbytes.backends.cpu.ops")
_KERNEL_NOTE = "Failed to load CPU gemm_4bit_forward"
_WORKFLOW_NAMES = ("run_sft", "get_dataset", "SFTDataCollatorWith4DAttentionMask", "CustomSeq2SeqTrainer")


def _check_shapes(tuner: ModuleType) -> tuple[ModuleType, ModuleType, ModuleType, ModuleType]:
    hparams = importlib.import_module("llamafactory.hparams")
    workflow = importlib.import_module("llamafactory.train.sft.workflow")
    callbacks = importlib.import_module("llamafactory.train.callbacks")
    ploting = importlib.import_module("llamafactory.extras.ploting")
    require(tuner, _TUNER_NAMES, "stage")
    require(hparams, ("read_args", "FinetuningArguments"), "stage")
    require(workflow, _WORKFLOW_NAMES, "stage")
    require(ploting, ("smooth",), "stage")
    require(callbacks, ("LogCallback",), "logging")
    require(callbacks.LogCallback, ("on_log", "_write_log"), "logging")
    for method in registered_methods():
        if method.host_stage != "sft":
            raise NotImplementedError(
                f"llamafactory-hera: method '{method.stage}' extends stage "
                f"'{method.host_stage}'; the stage patch offers only the SFT workflow."
            )
    return hparams, workflow, callbacks, ploting


@contextlib.contextmanager
def _swapped(module: ModuleType, **replacements: Any) -> Iterator[None]:
    """Temporarily replace module globals (restored even on error)."""
    saved = {name: getattr(module, name) for name in replacements}
    for name, value in replacements.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


class SFTWorkflow:
    """What a method's ``run`` gets of LLaMA-Factory's SFT workflow (0.9.5).

    ``collator`` / ``trainer``: the stock ``SFTDataCollatorWith4DAttentionMask`` / ``CustomSeq2SeqTrainer``
    (for the method to subclass); ``run(collator, trainer, model_args, ..., get_dataset=None)``: ``run_sft`` whole
    with those two (and, when given, its ``get_dataset(template, model_args, data_args, training_args, stage,
    **tokenizer_module) -> {"train_dataset": ..., "eval_dataset": ...}``) replaced for its duration (the host's is
    ``get_dataset``: the data tokenized, before the model loads); ``smooth``:
    the loss curves' smoothing (``extras.ploting.smooth``).
    """

    def __init__(self, workflow: ModuleType, smooth: Callable[..., Any]) -> None:
        self._workflow = workflow
        self.collator: type = workflow.SFTDataCollatorWith4DAttentionMask
        self.trainer: type = workflow.CustomSeq2SeqTrainer
        self.get_dataset: Callable[..., Any] = workflow.get_dataset
        self.smooth = smooth

    def run(self, collator: type, trainer: type, *args: Any, get_dataset: Callable[..., Any] | None = None) -> None:
        replaced = {"SFTDataCollatorWith4DAttentionMask": collator, "CustomSeq2SeqTrainer": trainer}
        if get_dataset is not None:
            replaced["get_dataset"] = get_dataset
        with _swapped(self._workflow, **replaced):
            self._workflow.run_sft(*args)


def apply(tuner: ModuleType) -> None:
    """Patch ``llamafactory.train.tuner`` (all or nothing)."""
    if getattr(tuner, "_llamafactory_hera_patched", False):
        return
    hparams, workflow, callbacks, ploting = _check_shapes(tuner)
    warn_if_unchecked()
    recipe_file.apply(tuner)  # run_exp's read of the recipe file: its mistakes named
    log_patch.apply(callbacks)
    original_training_function = tuner._training_function

    def training_function(config: dict[str, Any]) -> None:
        raw = hparams.read_args(config.get("args"))
        host_args, method_raw, method = split_args(raw)
        if method is None and not method_raw:  # a plain recipe: LLaMA-Factory's run alone, nothing of the plugin's
            return _run(config, host_args, method_raw, method)  # left in output_dir when it is killed
        # one live run per output_dir: claimed before anything else reads or writes the folder
        with run_claim.claimed(host_args, str(raw_value(raw, "stage") or "sft")):
            return _run(config, host_args, method_raw, method)

    def _run(config: dict[str, Any], host_args: Any, method_raw: dict[str, Any], method: Any) -> None:
        config = {**config, "args": host_args}
        output_dir.refuse_finished(host_args)  # before the parse, which would resume it
        if method is None:
            check_host_stage(host_args, os.environ)
            for other in registered_methods():
                ignored = sorted(k for k in method_raw if k.startswith(other.prefix))
                if ignored:
                    warnings.warn(
                        f"llamafactory-hera: ignoring {', '.join(ignored)} because the stage is not "
                        f"'{other.stage}' (this is how a recipe's baseline twin runs).",
                        stacklevel=3,
                    )
            # recorded only as a method's baseline twin (its recipe holds a method's keys): a plain recipe's
            # output_dir holds what LLaMA-Factory writes, nothing more
            with _recorded(tuner, str(raw_value(host_args, "stage") or "sft"), None, (), bool(method_raw)):
                return original_training_function(config)
        check, run_method, save_signal = _method_parts(
            method, method_raw, host_args, SFTWorkflow(workflow, ploting.smooth)
        )
        with (
            stop_signal.noting(save_signal, key=f"{method.prefix}save_on_signal"),
            _recorded(tuner, method.stage, check, method.records),
            _swapped(tuner, run_sft=run_method),
        ):
            return original_training_function(config)

    tuner._training_function = training_function
    tuner._llamafactory_hera_patched = True


def _method_parts(
    method: Any, method_raw: dict[str, Any], host_args: Any, host: SFTWorkflow
) -> tuple[Callable[..., None], Callable[..., None], str | None]:
    """(the method's checks of the parsed arguments, its run in place of ``run_sft``, its save signal: noted from
    here on, :mod:`.runtime.stop_signal`), after its raw checks."""
    own, ignored = keys_of(method, method_raw)
    if ignored:
        warnings.warn(
            f"llamafactory-hera: ignoring {', '.join(ignored)} because the stage is '{method.stage}'.", stacklevel=2
        )
    method_args = method_arguments(method, own, host_args)
    check_host_args = method.load("check_host_args")
    run = method.load("run")

    def check(*parsed: Any) -> None:
        check_host_args(*parsed, method_args)

    def run_method(
        model_args: Any,
        data_args: Any,
        training_args: Any,
        finetuning_args: Any,
        generating_args: Any,
        callbacks: Any = None,
    ) -> None:
        return run(host, model_args, data_args, training_args, finetuning_args, generating_args, callbacks, method_args)

    return check, run_method, getattr(method_args, f"{method.prefix}save_on_signal", None)


def method_arguments(method: Any, own: dict[str, Any], host_args: Any, machine: bool = True) -> Any:
    """The method's arguments from its own keys (``own``), after its checks of the raw recipe (nothing loaded): what
    a run checks before LLaMA-Factory parses the recipe (also run by :mod:`.launch` before torchrun
    starts, and by ``llamafactory-hera plan`` without this ``machine``'s checks). A backend switch that hands the run
    to another workflow (:mod:`.backends`) is refused first."""
    refused = backends.refusal(method.stage, host_args, os.environ if machine else {})
    if refused:
        raise RecipeError(refused)
    method_args = method.load("parse_arguments")(own)
    with _quiet_transformers():  # a raw check may read the model's config.json (HeRA's heads)
        method.check_raw(host_args, method_args, machine)
    return method_args


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' warnings only, for the block: LLaMA-Factory's parse turns its info logging on, and the checks'
    reads of the model's config and tokenizer would print every file read and the whole config (60-250 lines) before
    a one-line refusal; the model load that follows a passed check prints them as in an SFT run."""
    level = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity(max(level, transformers_logging.WARNING))
    try:
        yield
    finally:
        transformers_logging.set_verbosity(level)


def _unquantized_note(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_KERNEL_NOTE)


@contextlib.contextmanager
def _recorded(
    tuner: ModuleType,
    stage: str,
    check: Callable[..., None] | None,
    method_records: tuple[str, ...],
    record: bool = True,
) -> Iterator[None]:
    """``get_train_args`` for the run's duration: LLaMA-Factory's parse, the method's ``check`` of it, an earlier run's
    files moved aside under ``overwrite_output_dir`` (:mod:`.runtime.output_dir`; on several nodes, first, that they
    share it: :mod:`.runtime.shared_output`), a host stage's notes,
    bitsandbytes' 4-bit CPU kernel note held back unless bitsandbytes quantizes the model, then (with ``record``) the
    run's :mod:`.runtime.run_record` (training runs, by the main process) written ``running``;
    marked ``finished`` or ``failed`` when the run ends. A recipe refused by a check records nothing (an earlier run's
    record in ``output_dir`` is left as it was)."""
    written: list[Any] = []
    parse = tuner.get_train_args

    def get_train_args(args: Any = None) -> Any:
        parsed = parse(args)
        if check is not None:
            with _quiet_transformers():
                check(*parsed)
        model_args, data_args, training_args, finetuning_args = parsed[:4]
        if "bitsandbytes" not in sys.modules and not fsdp_loading.loads_bitsandbytes_weights(args):
            _BITSANDBYTES_CPU.addFilter(_unquantized_note)  # said only where a run quantizes
        main, training = getattr(training_args, "process_index", 0) == 0, getattr(training_args, "do_train", True)
        if record and training:  # every node reads its checkpoints and record: one folder they all see
            shared_output.refuse_unshared(training_args)
        output_dir.clear_for_overwrite(args, training_args)
        if check is None and main:  # a stock stage: the host's gradient, what FSDP saves of it
            with _quiet_transformers():
                note = reentrant_kv_note(model_args, training_args)
            for line in (note, training and fsdp_adapter.unsaved_refusal(stage, os.environ, note=True)):
                if line:
                    print(line, flush=True)
        # by the one global main process (save_on_each_node makes a main per node: one writer per folder), and for
        # training runs only (a do_predict run into the training folder must not replace its record)
        if record and main and training and getattr(training_args, "output_dir", None):
            written.append(
                run_record.write_started(
                    training_args.output_dir,
                    stage,
                    run_record.loading_keys(model_args, data_args, finetuning_args, training_args),
                    marks=check is not None,
                )
            )
        return parsed

    with _swapped(tuner, get_train_args=get_train_args):
        try:
            yield
        except BaseException as err:
            for path in written:
                run_record.write_ended(path, err, method_records)
            raise
        finally:
            _BITSANDBYTES_CPU.removeFilter(_unquantized_note)
    for path in written:
        run_record.write_ended(path, None)


def check_host_stage(host_args: Any, environ: Mapping[str, str]) -> None:
    """A recipe of no method's stage: the stage is LLaMA-Factory's, and a training run under the FSDP ``environ`` names
    (what ``accelerate launch`` sets) would not fail after loading (a state dict that saves no adapter is said, not
    refused: :func:`_recorded`)."""
    check_stage(raw_value(host_args, "stage"), [m.stage for m in registered_methods()], host_stages())
    stage = str(raw_value(host_args, "stage") or "sft")
    refusal = truthy(raw_value(host_args, "do_train")) and fsdp_loading.bitsandbytes_refusal(stage, host_args, environ)
    if refusal:
        raise RecipeError(refusal)


def check_stage(stage: Any, method_stages: list[str], host_stages: tuple[str, ...] | None) -> None:
    """A recipe's ``stage`` is the plugin's or LLaMA-Factory's (``host_stages``; None: not known, not checked)."""
    if stage is None or host_stages is None:
        return
    value = str(stage).strip().lower()
    if value in method_stages or value in host_stages:
        return
    close = difflib.get_close_matches(value, [*method_stages, *host_stages], n=1, cutoff=0.5)
    hint = f"did you mean {close[0]}? " if close else ""
    raise RecipeError(
        f"stage: {stage} is not a stage; {hint}stages: {', '.join(method_stages)} (llamafactory-hera), "
        f"{', '.join(host_stages)} (LLaMA-Factory)."
    )
