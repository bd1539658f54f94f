"""HARC's rows, tokenized with the recipe's template, and their seeded split. ``t_post`` is the last prompt token;
``t_inst = t_post - P``, ``P`` the template tokens after the content (docs/harc.md, "What a step computes")."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from llamafactory_hera.runtime.errors import RecipeError

ROLE_HARMFUL = 0
ROLE_HARMLESS = 1
ROLE_PSEUDO = 2
_SENTINELS = ("Alpha", "zq 7")


@dataclass(frozen=True)
class EncodedRow:
    """A tokenized row; ``response_ids`` is empty for prompt-only rows."""

    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    t_inst: int

    @property
    def t_post(self) -> int:
        return len(self.prompt_ids) - 1


def _fixed_tail(template: Any, tokenizer: Any, side: int) -> tuple[int, ...]:
    """The ids side ``side`` (0 prompt, 1 answer) of a one-turn encoding ends with whatever its content."""
    first, second = (
        list(
            template.encode_oneturn(
                tokenizer,
                [
                    {"role": "user", "content": "q" if side else text},
                    {"role": "assistant", "content": text if side else "ok"},
                ],
            )[side]
        )
        for text in _SENTINELS
    )
    size = 0
    while size < min(len(first), len(second)) and first[-1 - size] == second[-1 - size]:
        size += 1
    return tuple(first[len(first) - size :])


def template_tail(template: Any, tokenizer: Any) -> tuple[int, ...]:
    """The ``P`` template ids after ``t_inst``."""
    tail = _fixed_tail(template, tokenizer, 0)
    if not tail:
        raise RecipeError(
            "template: the prompt ends with the user's content (no assistant header after it); HARC "
            "reads the residual after the instruction and at the end of the assistant header. Use the "
            "model's chat template (e.g. llama3, qwen)."
        )
    return tail


def answer_tail(template: Any, tokenizer: Any) -> tuple[int, ...]:
    """Template ids after an answer (``<|eot_id|>`` for llama3, ``<|im_end|>\\n`` for qwen); may be empty."""
    return _fixed_tail(template, tokenizer, 1)


def without_answer_tail(rows: list[EncodedRow], tail: tuple[int, ...]) -> list[EncodedRow]:
    """``rows`` without the template's closing tokens: the reference extracts from the bare answer."""
    size = len(tail)
    return [
        EncodedRow(row.prompt_ids, row.response_ids[:-size], row.t_inst)
        if size and row.response_ids[-size:] == tail
        else row
        for row in rows
    ]


def encode_row(
    template: Any,
    tokenizer: Any,
    tail: tuple[int, ...],
    prompt: list[dict[str, str]],
    response: list[dict[str, str]],
    system: str | None,
    tools: str | None,
    max_length: int,
    where: str,
    closing: tuple[int, ...] = (),
) -> EncodedRow:
    """One aligned row, ``t_inst`` located. An answer keeps its first ``max_length`` tokens then ``closing``, as the
    reference cuts the answer and appends EOS."""
    if not prompt or prompt[-1].get("role") != "user" or not str(prompt[-1].get("content", "")).strip():
        raise RecipeError(f"{where}: the prompt has no user message with content; every HARC row needs one.")
    answer = response[:1] if response else [{"role": "assistant", "content": ""}]
    prompt_ids, response_ids = template.encode_oneturn(tokenizer, [*prompt, *answer], system, tools)
    prompt_ids = list(prompt_ids)[-max_length:]  # the reference cuts long prompts on the left
    response_ids = list(response_ids) if response and str(response[0].get("content", "")) else []
    if len(response_ids) > max_length:
        end = len(closing)
        closed = bool(end) and tuple(response_ids[-end:]) == closing
        response_ids = [*response_ids[:-end][:max_length], *closing] if closed else response_ids[:max_length]
    size = len(tail)
    if tuple(prompt_ids[-size:]) != tail or len(prompt_ids) <= size:
        raise RecipeError(
            f"{where}: the prompt does not end with the template's assistant header {list(tail)} "
            f"(it ends with {prompt_ids[-size:]}); cannot locate the instruction's last token. Check "
            "that `template` is the model's chat template."
        )
    return EncodedRow(tuple(prompt_ids), tuple(response_ids), len(prompt_ids) - 1 - size)


def encode_rows(
    template: Any,
    tokenizer: Any,
    tail: tuple[int, ...],
    aligned: Any,
    indices: list[int],
    max_length: int,
    dataset: str,
    key: str,
    with_response: bool = True,
    closing: tuple[int, ...] = (),
) -> list[EncodedRow]:
    """Rows ``indices`` of an aligned dataset, encoded; ``with_response=False`` keeps prompts only."""
    rows = []
    for index in indices:
        row = aligned[index]
        response = row["_response"] if with_response else []
        if with_response and (not response or not str(response[0].get("content", "")).strip()):
            raise RecipeError(
                f"{key}: dataset '{dataset}', row {index}: empty response; this role needs an answer per row."
            )
        rows.append(
            encode_row(
                template,
                tokenizer,
                tail,
                row["_prompt"],
                response,
                row.get("_system"),
                row.get("_tools"),
                max_length,
                f"{key}: dataset '{dataset}', row {index}",
                closing,
            )
        )
    return rows


@dataclass(frozen=True)
class Split:
    extract: list[int]
    validate: list[int]
    train: list[int]


def split_rows(num_rows: int, extract: int, validate: int, seed: int) -> Split:
    order = list(range(num_rows))
    random.Random(seed).shuffle(order)
    return Split(order[:extract], order[extract : extract + validate], order[extract + validate :])


def check_role_size(key: str, dataset: str, num_rows: int, needed: int, what: str) -> None:
    if num_rows < needed:
        raise RecipeError(
            f"{key}: dataset '{dataset}' has {num_rows} rows; {what} need at least {needed}. Add rows "
            "or lower harc_extract_samples / harc_validate_samples / the harc_batch_* keys."
        )
