"""HARC's micro-batches of every role (reference: 6 harmful + 4 harmless + 2 pseudo rows).

Item ``i`` of epoch ``e`` is micro-batch ``g = e * len + i`` and takes positions ``[g * b, (g + 1) * b)`` of each
role's endless seeded shuffle: it depends only on ``e``, ``i`` and the seed, under any sampler, workers or ranks.
Why epochs are whole optimizer steps: docs/harc.md ("Micro-batches").
"""

from __future__ import annotations

import functools
import math
import random
from typing import Any

import torch
from transformers import TrainerCallback
from typing_extensions import override

from llamafactory_hera.harc.data import ROLE_HARMFUL, ROLE_HARMLESS, ROLE_PSEUDO, EncodedRow

BATCH_KEYS = ("harc_response_mask", "harc_t_inst", "harc_t_post", "harc_role", "harc_harmful_rows", "harc_retain_rows")
ROLE_NAMES = {ROLE_HARMFUL: "harmful", ROLE_HARMLESS: "harmless", ROLE_PSEUDO: "pseudo-harmful"}


class ComposedMicroBatches(torch.utils.data.Dataset):
    """Item ``i`` -> ``{"harc_rows": [(role, EncodedRow), ...]}`` (harmful first)."""

    def __init__(
        self, rows: dict[int, list[EncodedRow]], sizes: dict[int, int], seed: int, step_items: int = 1
    ) -> None:
        self.rows = {role: rows[role] for role, size in sizes.items() if size > 0}
        self.sizes = {role: size for role, size in sizes.items() if size > 0}
        self.seed = seed
        self.step_items = step_items
        self.length = math.ceil(len(self.rows[ROLE_HARMFUL]) / (self.sizes[ROLE_HARMFUL] * step_items)) * step_items
        self.epoch = torch.zeros((), dtype=torch.long).share_memory_()  # read by the dataloader's workers

    def __len__(self) -> int:
        return self.length

    def begin_epoch(self, epoch: int) -> None:  # not set_epoch: accelerate's dataloader calls that on some engines
        self.epoch.fill_(epoch)

    def epoch_reads(self) -> str:
        """What an epoch reads of each role, e.g. "192 harmful rows of 100 (92 repeats), 128 harmless of 400 (...)"."""
        parts = []
        for role, size in self.sizes.items():
            reads = self.length * size
            count = len(self.rows[role])
            more = (
                f"{reads - count} repeats"
                if reads > count
                else f"every row within {math.ceil(count / reads)} epochs"
                if reads < count
                else "each once"
            )
            parts.append(f"{reads} {ROLE_NAMES[role]}{' rows' if not parts else ''} of {count} ({more})")
        return ", ".join(parts)

    @functools.lru_cache(maxsize=64)  # noqa: B019 - a few passes per role, the dataset lives as long as the run
    def _order(self, role: int, rounds: int) -> list[int]:
        order = list(range(len(self.rows[role])))
        random.Random(self.seed * 1_000_003 + role * 10_007 + rounds).shuffle(order)
        return order

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        chosen = []
        item = int(self.epoch) * self.length + index
        for role, size in self.sizes.items():
            count = len(self.rows[role])
            for position in range(item * size, (item + 1) * size):
                rounds, offset = divmod(position, count)
                chosen.append((role, self.rows[role][self._order(role, rounds)[offset]]))
        return {"harc_rows": chosen}


class StreamEpochs(TrainerCallback):
    """Sets the dataset's epoch from the optimizer steps taken: the same on every rank and on resume."""

    def __init__(self, dataset: ComposedMicroBatches) -> None:
        self.dataset = dataset

    @override
    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.dataset.begin_epoch(state.global_step * self.dataset.step_items // len(self.dataset))


def collate_rows(rows: list[tuple[int, EncodedRow]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors, ``[B, T]`` or ``[B]``; ``labels``: response ids on harmful rows (unshifted), -100
    elsewhere; ``harc_harmful_rows`` ``[H]`` / ``harc_retain_rows`` ``[B - H]``: row indices, built on the host so the
    step never reads roles back from the device."""
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
        prompt = len(row.prompt_ids)
        answer = len(row.response_ids)
        input_ids[i, : prompt + answer] = torch.tensor(row.prompt_ids + row.response_ids, dtype=torch.long)
        attention[i, : prompt + answer] = 1
        response[i, prompt : prompt + answer] = 1
        if role == ROLE_HARMFUL and answer:
            labels[i, prompt : prompt + answer] = torch.tensor(row.response_ids, dtype=torch.long)
        t_inst[i] = row.t_inst
        t_post[i] = row.t_post
        roles[i] = role
    harmful = [i for i, (role, _) in enumerate(rows) if role == ROLE_HARMFUL]
    retain = [i for i, (role, _) in enumerate(rows) if role != ROLE_HARMFUL]
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "labels": labels,
        "harc_response_mask": response,
        "harc_t_inst": t_inst,
        "harc_t_post": t_post,
        "harc_role": roles,
        "harc_harmful_rows": torch.tensor(harmful, dtype=torch.long),
        "harc_retain_rows": torch.tensor(retain, dtype=torch.long),
    }


class HarcCollator:
    """One :class:`ComposedMicroBatches` item -> :func:`collate_rows`'s tensors."""

    def __init__(self, tokenizer: Any = None, **_: Any) -> None:
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = [pair for feature in features for pair in feature["harc_rows"]]
        return collate_rows(rows, self.pad_id)
