"""HARC's role datasets, loaded by LLaMA-Factory's loader, split and tokenized. Harmful completions feed only the
response-side direction: their rows in the same seeded order, so with row-aligned files the harmful extraction's
prompts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llamafactory_hera.harc.config import HarcArguments
from llamafactory_hera.harc.data import (
    ROLE_HARMFUL,
    ROLE_HARMLESS,
    ROLE_PSEUDO,
    EncodedRow,
    answer_tail,
    check_role_size,
    encode_rows,
    split_rows,
    template_tail,
    without_answer_tail,
)
from llamafactory_hera.harc.directions import ExtractionRows

Loader = Callable[[str], Any]  # dataset name -> aligned rows (columns _prompt, _response, _system, _tools)


@dataclass
class RoleRows:
    train: dict[int, list[EncodedRow]]  # role -> training rows
    extraction: ExtractionRows
    validate_harmful: list[EncodedRow]
    validate_harmless: list[EncodedRow]
    eval_pseudo: list[EncodedRow]
    counts: dict[str, dict[str, int]]  # role key -> {"rows", "extract", "validate", "train"}


def load_role_rows(
    args: HarcArguments, load: Loader, template: Any, tokenizer: Any, seed: int, say: Callable[[str], None]
) -> RoleRows:
    """Read, check, split and encode every role."""
    tail = template_tail(template, tokenizer)
    closing = answer_tail(template, tokenizer)  # cut answers still end with it; removed again for the response means
    size = args.harc_max_length
    extract_n = args.harc_extract_samples
    validate_n = args.harc_validate_samples
    counts: dict[str, dict[str, int]] = {}

    def encode(key: str, aligned: Any, rows: list[int], with_response: bool = True) -> list[EncodedRow]:
        return encode_rows(
            template, tokenizer, tail, aligned, rows, size, getattr(args, key), key, with_response, closing
        )

    def held_out(key: str, batch: int) -> tuple[Any, Any]:
        aligned = load(getattr(args, key))
        check_role_size(
            key,
            getattr(args, key),
            len(aligned),
            extract_n + validate_n + batch,
            "harc_extract_samples + harc_validate_samples + one micro-batch",
        )
        split = split_rows(len(aligned), extract_n, validate_n, seed)
        counts[key] = {
            "rows": len(aligned),
            "extract": len(split.extract),
            "validate": len(split.validate),
            "train": len(split.train),
        }
        return aligned, split

    harmful, harmful_split = held_out("harc_harmful", args.harc_batch_harmful)
    harmless, harmless_split = held_out("harc_harmless", args.harc_batch_harmless)
    train = {
        ROLE_HARMFUL: encode("harc_harmful", harmful, harmful_split.train),
        ROLE_HARMLESS: encode("harc_harmless", harmless, harmless_split.train),
    }
    eval_pseudo: list[EncodedRow] = []
    if args.harc_batch_pseudo > 0:
        pseudo = load(args.harc_pseudo)
        check_role_size("harc_pseudo", args.harc_pseudo, len(pseudo), args.harc_batch_pseudo, "the micro-batches")
        train[ROLE_PSEUDO] = encode("harc_pseudo", pseudo, list(range(len(pseudo))))
        order = split_rows(len(pseudo), 0, 0, seed).train
        eval_pseudo = [train[ROLE_PSEUDO][i] for i in order[:validate_n]]
        counts["harc_pseudo"] = {"rows": len(pseudo), "extract": 0, "validate": len(eval_pseudo), "train": len(pseudo)}
    refusals = encode("harc_harmful", harmful, harmful_split.extract)
    completions = None
    if args.harc_harmful_completions:
        aligned = load(args.harc_harmful_completions)
        check_role_size(
            "harc_harmful_completions", args.harc_harmful_completions, len(aligned), extract_n, "harc_extract_samples"
        )
        chosen = split_rows(len(aligned), extract_n, 0, seed).extract
        completions = encode("harc_harmful_completions", aligned, chosen)
        counts["harc_harmful_completions"] = {"rows": len(aligned), "extract": len(chosen), "validate": 0, "train": 0}
        same = sum(a.prompt_ids == b.prompt_ids for a, b in zip(refusals, completions, strict=True))
        if same < len(refusals):
            say(
                f"note: {same} of {len(refusals)} harmful-completion extraction rows share their prompt with the "
                "harmful refusal rows (files written by `llamafactory-hera harc-data` are aligned row by row)."
            )
    else:
        say(
            "warning: no harc_harmful_completions: the response-side coupling is off (harc_couple_resp stays 0) "
            "and layers are scored on the prompt side only, 1 - |cos(v_ref, v_harm)|. Name a dataset of harmful "
            "prompts with harmful completions to run HARC whole."
        )
    helpful = encode("harc_harmless", harmless, harmless_split.extract)
    prompts = {"harc_extract_harmful": refusals, "harc_extract_harmless": helpful}  # prompt-side means
    for key in prompts:
        name = getattr(args, key)
        if name:
            aligned = load(name)
            check_role_size(key, name, len(aligned), 2, "the prompt-side means")
            prompts[key] = encode(key, aligned, list(range(min(extract_n, len(aligned)))), with_response=False)
            counts[key] = {"rows": len(aligned), "extract": len(prompts[key]), "validate": 0, "train": 0}
    # answers as bare text in the response-side means, as the reference's extraction
    extraction = ExtractionRows(
        harmful_prompts=prompts["harc_extract_harmful"],
        harmless_prompts=prompts["harc_extract_harmless"],
        refusals=without_answer_tail(refusals, closing),
        helpful=without_answer_tail(helpful, closing),
        completions=None if completions is None else without_answer_tail(completions, closing),
    )
    return RoleRows(
        train=train,
        extraction=extraction,
        validate_harmful=encode("harc_harmful", harmful, harmful_split.validate),
        validate_harmless=encode("harc_harmless", harmless, harmless_split.validate),
        eval_pseudo=eval_pseudo,
        counts=counts,
    )
