"""A recipe's arguments, model and data for a method's offline tools (head selection, calibration).

Checked on LLaMA-Factory 0.9.5 (:func:`check_host`). The loader's ``_get_merged_dataset`` gives the aligned columns
(``_prompt``, ``_response``, ``_images``), ``_get_preprocessed_dataset`` the training tokenization (one output row per
valid input row), and ``data_utils.split_dataset`` holds ``val_size`` rows out as training does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import datasets
from huggingface_hub import constants

from llamafactory_hera.runtime.errors import RecipeError
from llamafactory_hera.runtime.registry import method_for_stage, method_of_key

from ..data.templates import image_token_id
from ..engines.deepspeed import loaded_whole
from ..guard import require


@dataclass
class RecipeArgs:
    """The host's parsed arguments for reading a recipe's model and data."""

    model_args: Any
    data_args: Any
    finetuning_args: Any


def check_host() -> None:
    """Raise ``HostMismatchError`` unless every host name used here exists."""
    # lazy: the verbs' one-line checks import this module, before the host
    import llamafactory.data as data
    import llamafactory.data.data_utils as data_utils
    import llamafactory.data.loader as loader
    import llamafactory.hparams as hparams
    import llamafactory.model as model

    require(hparams, ("ModelArguments", "DataArguments", "FinetuningArguments", "get_infer_args"), "selection")
    require(model, ("load_tokenizer", "load_model"), "selection")
    require(data, ("get_template_and_fix_tokenizer", "SFTDataCollatorWith4DAttentionMask"), "selection")
    require(loader, ("_get_merged_dataset", "_get_preprocessed_dataset"), "selection")
    require(data_utils, ("split_dataset",), "selection")


def parse_recipe(recipe: dict[str, Any]) -> RecipeArgs:
    """Parse a recipe's model/data/fine-tuning keys; a method's stage reads as its host stage; ``max_samples`` is
    dropped (calibration pairs come from the whole dataset)."""
    check_host()
    # lazy: the verbs' one-line checks import this module, before the host
    import llamafactory.hparams as hparams

    known = {
        f.name
        for cls in (hparams.ModelArguments, hparams.DataArguments, hparams.FinetuningArguments)
        for f in dataclasses.fields(cls)
    }
    keys = {k: v for k, v in recipe.items() if k in known and method_of_key(k) is None}
    method = method_for_stage(keys.get("stage"))
    if method is not None:
        keys["stage"] = method.host_stage
    keys.pop("max_samples", None)
    model_args, data_args, finetuning_args, _ = hparams.get_infer_args(keys)
    return RecipeArgs(model_args, data_args, finetuning_args)


def training_args_for_reading(seed: int) -> Any:
    """Minimal ``Seq2SeqTrainingArguments`` for the host's data loader."""
    from transformers import Seq2SeqTrainingArguments  # lazy: only for reading rows outside a run

    # The loader never writes output_dir; an uncreated path leaves no folder behind.
    unused = os.path.join(tempfile.gettempdir(), f"llamafactory_hera_reading_unused_{os.getpid()}")
    args = Seq2SeqTrainingArguments(output_dir=unused, seed=seed, report_to=[])
    # Selection runs on rank 0 only (hera_heads: auto; the others wait in a broadcast): the loader's "main process
    # first" barrier would hang, so it is a no-op.
    args.main_process_first = lambda *a, **k: contextlib.nullcontext()
    return args


def load_aligned_rows(args: RecipeArgs, seed: int, dataset: list[str] | None = None, training_args: Any = None) -> Any:
    """The recipe's datasets in aligned format. Inside a run pass its ``training_args`` and call under its
    ``main_process_first``: no new training arguments reset accelerate's state."""
    # lazy: the verbs' one-line checks import this module, before the host
    import llamafactory.data.loader as loader

    names = dataset or args.data_args.dataset
    if not names:
        raise RecipeError("dataset: the recipe names no dataset; head selection needs image-caption pairs.")
    return loader._get_merged_dataset(
        names, args.model_args, args.data_args, training_args or training_args_for_reading(seed), stage="sft"
    )


def scoring_device_map(device: str) -> dict[str, str]:
    """``device_map`` for a model loaded whole on ``device`` ("cuda:3", "cpu"). The CPU goes by its plain name:
    transformers 4.55's safetensors loading refuses "cpu:0", a CPU rank's training_args.device."""
    return {"": "cpu" if device.partition(":")[0] == "cpu" else device}


def load_model_for_scoring(
    args: RecipeArgs, device: str, device_map: dict[str, Any] | None = None
) -> tuple[Any, dict[str, Any], Any]:
    """(model in eval mode on ``device`` or by ``device_map``, tokenizer module, template) as the host loads them."""
    # lazy: the verbs' one-line checks import this module, before the host
    import llamafactory.data as data
    import llamafactory.model as model_module

    args.model_args.device_map = device_map or scoring_device_map(device)
    tokenizer_module = model_module.load_tokenizer(args.model_args)
    template = data.get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], args.data_args)
    # a whole copy: under FSDP's efficient loading the host would drop the device_map (a CPU model scored on GPU)
    # and transformers accelerate's dispatch
    with loaded_whole():
        model = model_module.load_model(
            tokenizer_module["tokenizer"], args.model_args, args.finetuning_args, is_trainable=False
        )
    return model.eval(), tokenizer_module, template


def multimodal_dataset_and_collator(
    args: RecipeArgs,
    model: Any,
    tokenizer_module: dict[str, Any],
    template: Any,
    seed: int,
    rows: list[int],
    dataset: list[str] | None = None,
) -> tuple[Any, Any]:
    """The aligned ``rows`` tokenized as in training, and the SFT collator. Row ``i`` is ``rows[i]``: no validation
    split or dropped row can shift which tokens go with which teacher feature."""
    return tokenized_rows_and_collator(
        args, model, tokenizer_module, template, seed, load_aligned_rows(args, seed, dataset).select(rows)
    )


def tokenized_rows_and_collator(
    args: RecipeArgs,
    model: Any,
    tokenizer_module: dict[str, Any],
    template: Any,
    seed: int,
    chosen: Any,
    training_args: Any = None,
) -> tuple[Any, Any]:
    """Aligned rows ``chosen`` tokenized as in training (row ``i`` is ``chosen[i]``), and the SFT collator (no HeRA
    keys)."""
    # lazy: the verbs' one-line checks import this module, before the host
    import llamafactory.data as data
    import llamafactory.data.loader as loader

    reading = training_args or training_args_for_reading(seed)
    tokenized = loader._get_preprocessed_dataset(
        chosen,
        args.data_args,
        reading,
        "sft",
        template,
        tokenizer_module["tokenizer"],
        tokenizer_module.get("processor"),
    )
    if len(tokenized) != len(chosen):
        raise RecipeError(
            f"head scoring: LLaMA-Factory's tokenization kept {len(tokenized)} of the {len(chosen)} "
            "chosen image-caption rows; each must be one user turn and one answer."
        )
    collator = data.SFTDataCollatorWith4DAttentionMask(
        template=template, model=model, pad_to_multiple_of=8, label_pad_token_id=-100, **tokenizer_module
    )
    return tokenized, collator


def holds_out_by_val_size(data_args: Any) -> bool:
    """Whether the host holds ``val_size`` rows out (no ``eval_dataset``, not streaming)."""
    return not data_args.eval_dataset and data_args.val_size > 1e-6 and not data_args.streaming


def _val_size_split(args: RecipeArgs, seed: int, rows: Any) -> tuple[Any, Any] | None:
    """(training rows, validation rows) of the host's ``val_size`` split with the run's seed, or None if none."""
    data_args = args.data_args
    if not holds_out_by_val_size(data_args):
        return None
    # lazy: the verbs' one-line checks import this module, before the host
    import llamafactory.data.data_utils as data_utils

    train, held_out = data_utils.split_dataset(rows, None, data_args, seed=seed)
    return train["train"], held_out["validation"]


def training_rows(args: RecipeArgs, seed: int, rows: Any) -> Any:
    """``rows`` without the ``val_size`` split's validation rows."""
    split = _val_size_split(args, seed, rows)
    return rows if split is None else split[0]


def split_rows(args: RecipeArgs, seed: int, rows: Any) -> tuple[Any, Any, str]:
    """(training rows, held-out rows or None, what was held out) as the host splits."""
    data_args = args.data_args
    if data_args.eval_dataset:
        return rows, load_aligned_rows(args, seed, data_args.eval_dataset), f"eval_dataset {data_args.eval_dataset}"
    split = _val_size_split(args, seed, rows)
    if split is not None:
        return split[0], split[1], f"val_size {data_args.val_size}"
    return rows, None, ""


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Hub and datasets offline for the block: an uncached model or dataset raises."""
    saved = (constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE)
    constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved[0]
        datasets.config.HF_HUB_OFFLINE = saved[1]


def sampled_rows(recipe: dict[str, Any], count: int, seed: int) -> tuple[int, list[tuple[int, int, int]]]:
    """(rows a run of ``recipe`` trains on, ``count`` of them drawn by ``seed`` as (tokens, images, image tokens)),
    tokenized as in training. Offline: an uncached model or dataset raises."""
    # lazy: the verbs' one-line checks import this module, before the host
    import llamafactory.data as data
    import llamafactory.data.loader as loader
    import llamafactory.model as model

    with _offline():
        args = parse_recipe(recipe)
        tokenizer_module = model.load_tokenizer(args.model_args)
        tokenizer = tokenizer_module["tokenizer"]
        template = data.get_template_and_fix_tokenizer(tokenizer, args.data_args)
        rows = load_aligned_rows(args, seed)
        rows = training_rows(args, seed, rows.select(range(min(len(rows), recipe.get("max_samples") or len(rows)))))
        chosen = rows.shuffle(seed=seed).select(range(min(count, len(rows))))
        with contextlib.redirect_stdout(io.StringIO()):  # the loader prints the first row
            tokenized = loader._get_preprocessed_dataset(
                chosen,
                args.data_args,
                training_args_for_reading(seed),
                "sft",
                template,
                tokenizer,
                tokenizer_module.get("processor"),
            )
    token = image_token_id(template, tokenizer)
    return len(rows), [
        (len(ids), len(images or []), ids.count(token))
        for ids, images in zip(tokenized["input_ids"], tokenized["images"], strict=True)
    ]
