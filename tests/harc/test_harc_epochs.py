"""HARC's role streams across epochs: each epoch reads the next rows of every role's stream, through the Trainer's own
loop (dataloader workers, persistent ones too, and resuming from a checkpoint mid-epoch or at an epoch's end)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

from llamafactory_hera.harc.batches import ComposedMicroBatches, StreamEpochs
from llamafactory_hera.harc.data import ROLE_HARMFUL, ROLE_HARMLESS, ROLE_PSEUDO


def _uses(data: ComposedMicroBatches, epochs: int) -> dict[int, Counter]:
    """How often each row of each role is read over the first ``epochs`` epochs."""
    uses: dict[int, Counter] = {role: Counter() for role in data.sizes}
    for epoch in range(epochs):
        data.begin_epoch(epoch)
        for index in range(len(data)):
            for role, row in data[index]["harc_rows"]:
                uses[role][row] += 1
    return uses


def test_each_epoch_reads_the_next_rows_of_every_role_stream() -> None:
    """100 harmful and 400 harmless rows, 6 + 4 a micro-batch, 8 ranks x accumulation 4: an epoch is 32 micro-batches,
    192 harmful reads (92 repeats) and 128 harmless ones. Over 3 epochs the 384 harmless reads are 384 different rows;
    over 4 every harmless row is read, once or twice; every harmful row 5 or 6 times in 3 epochs. Item ``i`` of epoch
    ``e`` is item ``e * 32 + i`` of a dataset whose first epoch is long enough (the same streams)."""
    rows = {ROLE_HARMFUL: [f"f{k}" for k in range(100)], ROLE_HARMLESS: [f"s{k}" for k in range(400)]}
    sizes = {ROLE_HARMFUL: 6, ROLE_HARMLESS: 4, ROLE_PSEUDO: 0}
    data = ComposedMicroBatches(rows, sizes, 3, 8 * 4)
    assert len(data) == 32
    assert data.epoch_reads() == "192 harmful rows of 100 (92 repeats), 128 harmless of 400 (every row within 4 epochs)"
    three = _uses(data, 3)
    assert len(three[ROLE_HARMLESS]) == 384 and set(three[ROLE_HARMLESS].values()) == {1}
    assert set(three[ROLE_HARMFUL].values()) == {5, 6} and len(three[ROLE_HARMFUL]) == 100
    four = _uses(data, 4)[ROLE_HARMLESS]
    assert len(four) == 400 and max(four.values()) / min(four.values()) <= 2

    long = ComposedMicroBatches(rows, sizes, 3, 4 * 32)
    assert len(long) == 128
    for epoch in (0, 1, 3):
        data.begin_epoch(epoch)
        assert all(data[index] == long[epoch * 32 + index] for index in range(32))


class _Recorder(torch.nn.Module):
    """A one-weight model that records the rows of each micro-batch it is given (in the main process)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))
        self.seen: list[tuple[int, ...]] = []

    def forward(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        self.seen.append(tuple(rows.tolist()))
        return {"loss": (self.weight * rows.sum()).sum()}


def _train(data: ComposedMicroBatches, output: Path, resume: Path | None = None) -> list[tuple[int, ...]]:
    """7 optimizer steps of 2 micro-batches (3 steps an epoch, shuffled), a checkpoint every 2, one persistent
    dataloader worker: the rows of each micro-batch trained."""
    model = _Recorder()
    args = TrainingArguments(str(output), max_steps=7, per_device_train_batch_size=1, gradient_accumulation_steps=2,
                             save_steps=2, dataloader_num_workers=1, dataloader_persistent_workers=True, use_cpu=True,
                             report_to="none", disable_tqdm=True, logging_steps=100, seed=5,
                             remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[StreamEpochs(data)],
                      data_collator=lambda items: {"rows": torch.tensor([row for item in items
                                                                         for _, row in item["harc_rows"]])})
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return model.seen


def test_the_trainer_reads_the_next_rows_each_epoch_and_when_resumed(tmp_path: Path) -> None:
    """The Trainer's loop with a persistent dataloader worker (forked once, it reads the epoch from shared memory):
    each epoch's micro-batches are that epoch's items; a run resumed mid-epoch (step 4) or at an epoch's end (step 6)
    trains the uninterrupted run's micro-batches."""
    rows = {ROLE_HARMFUL: list(range(10)), ROLE_HARMLESS: list(range(100, 107)), ROLE_PSEUDO: list(range(200, 203))}
    sizes = {ROLE_HARMFUL: 2, ROLE_HARMLESS: 3, ROLE_PSEUDO: 1}
    data = ComposedMicroBatches(rows, sizes, 1, 2)
    assert len(data) == 6  # 3 optimizer steps an epoch: the 7 steps reach epoch 2
    seen = _train(data, tmp_path / "whole")
    assert len(seen) == 14
    reference = ComposedMicroBatches(rows, sizes, 1, 18)  # one epoch of 18 items: the same streams
    for epoch in range(3):  # each epoch's micro-batches, shuffled: that epoch's items (epoch 2: its first step)
        got = seen[epoch * 6:(epoch + 1) * 6]
        items = {tuple(row for _, row in reference[epoch * 6 + index]["harc_rows"]) for index in range(6)}
        assert len(set(got)) == len(got) and set(got) <= items
    for step in (4, 6):
        data.begin_epoch(0)  # as a new process would start
        assert _train(data, tmp_path / f"resumed{step}", tmp_path / "whole" / f"checkpoint-{step}") == seen[2 * step:]
