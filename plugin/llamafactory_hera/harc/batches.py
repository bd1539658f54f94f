"""HARC's micro-batches: each one holds ``harc_batch_harmful`` harmful, ``harc_batch_harmless`` harmless and
``harc_batch_pseudo`` pseudo-harmful rows (the reference's 6 + 4 + 2), so that every optimizer step sees every role.

The Trainer's dataset is :class:`ComposedMicroBatches`: item ``i`` is one whole micro-batch (so
``per_device_train_batch_size`` is 1). Each role is read as an endless stream of seeded shuffles of its training
rows (a new shuffle per pass, as the reference's ``category_iterator``); item ``i`` takes positions
``[i * b, (i + 1) * b)`` of every role's stream, so an item depends only on ``i`` and the seed, under any sampler,
worker count or number of ranks. One epoch is one pass over the harmful training rows, rounded up to whole optimizer
steps (``step_items`` micro-batches: per-device batch x accumulation x ranks), the last items continuing the streams:
every optimizer step then takes ``step_items`` whole micro-batches, so N ranks take at each step the items one process
with N times the accumulation takes (a shorter last step, or the sampler's wrap-around on the ranks, would not).
"""

from __future__ import annotations

import functools
import math
import random
from typing import Any

import torch

from llamafactory_hera.harc.data import ROLE_HARMFUL, EncodedRow

BATCH_KEYS = ("harc_response_mask", "harc_t_inst", "harc_t_post", "harc_role", "harc_harmful_rows",
              "harc_retain_rows")


class ComposedMicroBatches(torch.utils.data.Dataset):
    """``len`` micro-batches; item ``i`` -> ``{"harc_rows": [(role, EncodedRow), ...]}`` (harmful rows first)."""

    def __init__(self, rows: dict[int, list[EncodedRow]], sizes: dict[int, int], seed: int,
                 step_items: int = 1) -> None:
        self.rows = {role: rows[role] for role, size in sizes.items() if size > 0}
        self.sizes = {role: size for role, size in sizes.items() if size > 0}
        self.seed = seed
        self.length = math.ceil(len(self.rows[ROLE_HARMFUL]) / (self.sizes[ROLE_HARMFUL] * step_items)) * step_items

    def __len__(self) -> int:
        return self.length

    @functools.lru_cache(maxsize=64)  # noqa: B019 - a few passes per role, the dataset lives as long as the run
    def _order(self, role: int, epoch: int) -> list[int]:
        order = list(range(len(self.rows[role])))
        random.Random(self.seed * 1_000_003 + role * 10_007 + epoch).shuffle(order)
        return order

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        chosen = []
        for role, size in self.sizes.items():
            count = len(self.rows[role])
            for position in range(index * size, (index + 1) * size):
                epoch, offset = divmod(position, count)
                chosen.append((role, self.rows[role][self._order(role, epoch)[offset]]))
        return {"harc_rows": chosen}


def collate_rows(rows: list[tuple[int, EncodedRow]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors of ``rows`` (B rows, T = longest prompt + response).

    ``input_ids`` / ``attention_mask`` ``[B, T]``; ``labels`` ``[B, T]``: the response ids on harmful rows (the CE
    target; not yet shifted), -100 elsewhere; ``harc_response_mask`` ``[B, T]``: 1 on every row's response tokens;
    ``harc_t_inst`` / ``harc_t_post`` ``[B]``; ``harc_role`` ``[B]`` (0 harmful, 1 harmless, 2 pseudo);
    ``harc_harmful_rows`` ``[H]`` / ``harc_retain_rows`` ``[B - H]``: the indices of the harmful / other rows, known
    here on the host so that the training step selects rows without reading its roles back from the device.
    """
    width = max(len(row.prompt_ids) + len(row.response_ids) for _, row in rows)
    size = len(rows)
    input_ids = torch.full((size, width), pad_id, dtype=torch.long)
    attention = torch.zeros((size, width), dtype=torch.long)
    labels = torch.full((size, width), -100, dtype=torch.long)
    response = torch.zeros((size, width), dtype=torch.long)
    t_inst = torch.zeros(size, dtype=torch.long)
    t_post = torch.zeros(size, dtype=torch.long)
    roles = torch.zeros(size, dtype=torch.long)
    for i, (role, row) in enumerate(rows):
        prompt, answer = len(row.prompt_ids), len(row.response_ids)
        input_ids[i, :prompt + answer] = torch.tensor(row.prompt_ids + row.response_ids, dtype=torch.long)
        attention[i, :prompt + answer] = 1
        response[i, prompt:prompt + answer] = 1
        if role == ROLE_HARMFUL and answer:
            labels[i, prompt:prompt + answer] = torch.tensor(row.response_ids, dtype=torch.long)
        t_inst[i], t_post[i], roles[i] = row.t_inst, row.t_post, role
    harmful = [i for i, (role, _) in enumerate(rows) if role == ROLE_HARMFUL]
    retain = [i for i, (role, _) in enumerate(rows) if role != ROLE_HARMFUL]
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels, "harc_response_mask": response,
            "harc_t_inst": t_inst, "harc_t_post": t_post, "harc_role": roles,
            "harc_harmful_rows": torch.tensor(harmful, dtype=torch.long),
            "harc_retain_rows": torch.tensor(retain, dtype=torch.long)}


class HarcCollator:
    """The Trainer's collator: one :class:`ComposedMicroBatches` item -> :func:`collate_rows`'s tensors.

    Built by LLaMA-Factory's SFT workflow with the stock collator's keyword arguments (only ``tokenizer`` is read).
    """

    def __init__(self, tokenizer: Any = None, **_: Any) -> None:
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = [pair for feature in features for pair in feature["harc_rows"]]
        return collate_rows(rows, self.pad_id)
