"""A ``stage: harc`` run: LLaMA-Factory's SFT workflow with HARC's composed micro-batches and HARC's trainer."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from typing_extensions import override

from llamafactory_hera import __version__
from llamafactory_hera.harc.batches import ComposedMicroBatches, HarcCollator
from llamafactory_hera.harc.config import HarcArguments
from llamafactory_hera.harc.data import ROLE_HARMFUL, ROLE_HARMLESS, ROLE_PSEUDO
from llamafactory_hera.harc.evaluate import stop_ids
from llamafactory_hera.harc.outputs import finish_run
from llamafactory_hera.harc.roles import load_role_rows
from llamafactory_hera.harc.state import HarcState
from llamafactory_hera.harc.trainer import HarcTrainerMixin
from llamafactory_hera.runtime.log import progress_once, say_again_on_board, say_once
from llamafactory_hera.runtime.parsed_arguments import HostArguments
from llamafactory_hera.runtime.run_record import plain, write_record
from llamafactory_hera.training.eval_forward import keep_4bit_layout
from llamafactory_hera.training.trainer_base import MethodTrainer
from llamafactory_hera_patches.sft_classes import HostTrainer
from llamafactory_hera_patches.tools.model_data import RecipeArgs, load_aligned_rows


@dataclass
class RunContext:
    """What the trainer needs beyond its arguments, set as the datasets load."""

    rows: Any = None
    tokenizer: Any = None
    stop_ids: list[int] | None = None
    state: Any = None
    plot: bool = True
    smooth: Callable[[list[float]], list[float]] | None = None
    say: Callable[[str], None] = say_once
    progress: Callable[[Iterable[Any], str], Iterable[Any]] = progress_once


HARC_RUN_RECORD = "harc_run.json"
_HOST_KEYS = (
    ("model_name_or_path", "adapter_name_or_path", "trust_remote_code"),
    ("template", "dataset_dir", "cutoff_len"),
    ("finetuning_type",),
    ("seed", "output_dir"),
)


def write_run_record(harc_args: HarcArguments, *holders: Any) -> None:
    """``harc_run.json``: the keys that reload the model and role data (read by ``llamafactory-hera eval``)."""
    host = {
        key: plain(getattr(holder, key, None)) for holder, keys in zip(holders, _HOST_KEYS, strict=True) for key in keys
    }
    record = {"stage": "harc", "llamafactory_hera_version": __version__, "settings": asdict(harc_args), "host": host}
    write_record(Path(holders[-1].output_dir) / HARC_RUN_RECORD, record)


def prepare(harc_args: HarcArguments, parsed: HostArguments) -> None:
    say_again_on_board()  # LlamaBoard's log box lost the recipe checks' lines (a host warning)
    if parsed.training.should_save:
        write_run_record(harc_args, parsed.model, parsed.data, parsed.finetuning, parsed.training)


class HarcSeq2SeqTrainer(HarcTrainerMixin, MethodTrainer, HostTrainer):
    """HARC's step on the trainer base over LLaMA-Factory's trainer."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        keep_4bit_layout(self.model)  # through every eval forward: directions and the end-of-run generation

    @override
    def finish_run(self) -> None:
        finish_run(self)  # the refusal evaluation, diagnostics, plots


def train(harc_args: HarcArguments, host: Any, parsed: HostArguments, callbacks: Any, prepared: None) -> None:
    run = RunContext(plot=bool(parsed.finetuning.plot_loss), smooth=host.smooth)

    def get_dataset(
        template: Any,
        model_args: Any,
        data_args: Any,
        training_args: Any,
        stage: str = "sft",
        tokenizer: Any = None,
        processor: Any = None,
        **_: Any,
    ) -> dict[str, Any]:
        # main process first, as LLaMA-Factory's get_dataset: the other ranks then read the datasets cache
        with training_args.main_process_first(
            desc="load HARC's role datasets", local=not getattr(data_args, "data_shared_file_system", False)
        ):
            recipe = RecipeArgs(model_args, data_args, None)
            rows = load_role_rows(
                harc_args,
                lambda name: load_aligned_rows(recipe, training_args.seed, [name], training_args=training_args),
                template,
                tokenizer,
                training_args.seed,
                say_once,
            )
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        run.rows = rows
        run.tokenizer = tokenizer
        run.stop_ids = stop_ids(tokenizer, template)
        run.state = HarcState(
            harc_args, rows.extraction, (rows.validate_harmful, rows.validate_harmless), pad_id, progress_once
        )
        sizes = {
            ROLE_HARMFUL: harc_args.harc_batch_harmful,
            ROLE_HARMLESS: harc_args.harc_batch_harmless,
            ROLE_PSEUDO: harc_args.harc_batch_pseudo,
        }
        dataset = ComposedMicroBatches(
            rows.train,
            sizes,
            training_args.seed,
            training_args.world_size
            * training_args.per_device_train_batch_size
            * training_args.gradient_accumulation_steps,
        )
        counts = ", ".join(
            f"{key[5:]} {c['train']} train / {c['extract']} extract / {c['validate']} validate"
            for key, c in rows.counts.items()
        )
        say_once(
            f"HARC: {counts}; micro-batches of {sum(sizes.values())} rows ({harc_args.harc_batch_harmful} "
            f"harmful, {harc_args.harc_batch_harmless} harmless, {harc_args.harc_batch_pseudo} pseudo), "
            f"{len(dataset)} per epoch, which reads {dataset.epoch_reads()}; margin {harc_args.harc_margin}, "
            f"weights couple {harc_args.harc_weight_couple} / couple_resp "
            f"{harc_args.harc_weight_couple_resp if harc_args.response_coupling else 0} / kl "
            f"{harc_args.harc_weight_kl} / ce {harc_args.harc_weight_ce}; refresh every "
            f"{harc_args.harc_refresh_steps} optimizer steps"
        )
        return {"train_dataset": dataset, "eval_dataset": None}

    host.run(
        HarcCollator,
        HarcSeq2SeqTrainer,
        *parsed,
        callbacks,
        get_dataset=get_dataset,
        trainer_kwargs={"harc_args": harc_args, "harc_run": run},
    )
