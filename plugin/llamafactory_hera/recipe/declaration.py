"""A method's declaration: how LLaMA-Factory's recipes, web UI and logs see a method (:class:`Method`).

Every method is declared once, in :mod:`llamafactory_hera.methods`, the registry above the methods' packages; the
patches read a declaration by these field names only. A declaration imports cheaply (no torch): the parts it names as
``"module:attribute"`` strings are imported on first use (:func:`resolve`).

How a method's keys are declared and read is :mod:`llamafactory_hera.recipe.keys` (every method's ``config.py``
imports that, not this module: a method's arguments do not bring the checks that :meth:`Method.check_raw` runs).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from llamafactory_hera.job_refusal import watch


@dataclass(frozen=True)
class Method:
    """One method, as LLaMA-Factory's recipes, web UI and logs see it.

    The ``"module:attribute"`` fields are called as follows (``host_args``: a recipe dict or a
    ``--key value`` list without the method's keys; LLaMA-Factory's parsed argument objects by name):

    - ``parse_arguments(raw: dict[str, Any]) -> args``: the method's prefixed keys, values possibly strings;
    - ``check_raw_host_args(host_args, args) -> None``: before LLaMA-Factory parses anything (no loading);
    - ``check_host_args(model_args, data_args, training_args, finetuning_args, generating_args, args) -> None``:
      right after LLaMA-Factory parsed the recipe, before any model or dataset is loaded;
    - ``run(host, model_args, data_args, training_args, finetuning_args, generating_args, callbacks, args)
      -> None``: the run, instead of the host stage's workflow; ``host`` is what the patches
      offer of that workflow (``patches.stage.SFTWorkflow``: its collator and trainer classes, ``run`` with
      replacements, ``smooth``);
    - ``panel``: the method's LlamaBoard panel, a :class:`llamafactory_hera.board.builder.MethodPanel`
      built from the declaration in its ``webui_panel`` module (fields from its arguments dataclass) and the texts
      of its ``panel_texts.yaml``;
    - ``add_cli_verbs(subparsers) -> dict[str, handler]``: its ``llamafactory-hera`` verbs; a handler takes
      the parsed namespace and raises ``ValueError`` / ``OSError`` subclasses for the user's mistakes;
    - ``plan(args: dict) -> str``: the run's memory, fit and time for LlamaBoard's run arguments (its panel's plan
      button shows it).
    """

    stage: str  # the recipe's ``stage:`` value
    label: str  # LlamaBoard's training-stage dropdown entry
    prefix: str  # the method's recipe keys start with this
    host_stage: str  # the LLaMA-Factory stage that parses the recipe and whose workflow the run extends
    parse_arguments: str
    check_raw_host_args: str
    check_host_args: str
    run: str
    log_keys: tuple[str, ...]  # metrics the method logs, merged into trainer_log.jsonl ("x/": every "x/..." key)
    panel: str | None = None
    add_cli_verbs: str | None = None
    plan: str | None = None
    records: tuple[str, ...] = ()  # files the run writes into output_dir that say a run happened (marked if it fails)
    one_process: bool = False  # runs as one process over every visible GPU: llamafactory-cli train starts one rank

    def load(self, field: str) -> Any:
        """Import what ``field`` names (``"module:attribute"``)."""
        return resolve(getattr(self, field))

    def check_raw(self, host_args: dict[str, Any] | list[str], args: Any, machine: bool = True) -> None:
        """Before LLaMA-Factory parses anything: the launch checks every method runs (precision, DeepSpeed path, FSDP,
        streaming), the method's own ``check_raw_host_args``, then the checks every method runs of the keys
        LLaMA-Factory reads (unknown keys, values, template, numbers, model paths, ``lora_target``) and of the
        checkpoint it resumes from (:mod:`llamafactory_hera.recipe.resume`); ``machine=False``: not this machine's
        (``check_raw_recipe``'s) nor the checkpoint's."""
        # lazy: the checks only when a recipe is checked; the registry imports this module whenever a patch applies
        from llamafactory_hera.recipe.raw_checks import check_raw_launch, check_raw_recipe
        from llamafactory_hera.recipe.resume import check_resume

        watch()  # a rank of a method's job ends when another refuses (a stock stage's rank is left as stock runs)
        check_raw_launch(self.stage, host_args)
        self.load("check_raw_host_args")(host_args, args)
        check_raw_recipe(host_args, self.stage, machine)
        if machine:
            check_resume(self.stage, host_args)

    def owns(self, stage: Any) -> bool:
        """Whether a recipe's or the web UI's ``stage`` value selects this method."""
        return str(stage or "").strip().lower() == self.stage


def resolve(target: str) -> Any:
    """``"package.module:attribute"`` -> the attribute; ``"package.module"`` -> the module."""
    module, _, attribute = target.partition(":")
    loaded = importlib.import_module(module)
    return getattr(loaded, attribute) if attribute else loaded
