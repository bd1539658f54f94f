"""The lengths plan counts a step at: a sample of the recipe's rows tokenized as training does, else the worst case
(docs/cost.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from llamafactory_hera.plan.estimate import found
from llamafactory_hera.recipe.dataset_info import as_names
from llamafactory_hera_patches.tools.model_data import sampled_rows

SAMPLE = 300  # rows sampled
SEED = 0  # the sample's seed


@dataclass(frozen=True)
class Lengths:
    peak: int  # tokens of the row memory is counted at
    image_tokens: int  # its one image's tokens
    padded: float  # a micro-batch's mean length padded to its longest row (step time)
    mean: float  # a row's mean tokens (tokens per second)
    rows: int | None  # an epoch's rows (None: unknown)
    line: str  # what the report says about them


def lengths_of(recipe: dict, recipe_dir: Path, batch: int, cutoff: int, worst_image_tokens: int) -> Lengths:
    """``recipe``'s row lengths; ``worst_image_tokens``: an image of ``image_max_pixels``'s tokens."""
    names = as_names(recipe.get("dataset"))
    folder = found(recipe.get("dataset_dir", "data"), recipe_dir)
    try:
        if not names:
            raise ValueError("the recipe names no dataset")
        total, rows = sampled_rows(
            {**recipe, "dataset_dir": str(folder), "preprocessing_num_workers": None}, SAMPLE, SEED
        )
        if not rows:
            raise ValueError(f"LLaMA-Factory's tokenization kept none of {', '.join(names)}'s rows")
    except Exception as err:  # noqa: BLE001  rows unreadable offline, for any reason: the worst case, named
        why = " ".join((str(e).strip() or type(e).__name__).splitlines()[0] for e in (err, err.__cause__) if e)
        image = f"one image of {worst_image_tokens} tokens" if worst_image_tokens else "no image"
        return Lengths(
            cutoff,
            worst_image_tokens,
            cutoff,
            cutoff,
            None,
            f"lengths: worst case (the recipe's rows cannot be read and tokenized offline: {why}), every "
            f"row {cutoff} tokens with {image}",
        )
    tokens = sorted(row[0] for row in rows)
    longest = tokens[-1]
    most_images = max(row[2] for row in rows)
    whole = len(rows) >= total  # every row read: no micro-batch holds a longer one
    peak = longest if whole else cutoff
    image_tokens = most_images if whole else max(most_images, worst_image_tokens)
    groups = [rows[i : i + batch] for i in range(0, len(rows), batch)]
    padded = sum(max(row[0] for row in group) for group in groups) / len(groups)
    mean = sum(tokens) / len(tokens)
    memory_at = (
        f"memory at the longest row with the most image tokens ({image_tokens})"
        if whole
        else f"memory at cutoff_len with an image of image_max_pixels ({image_tokens} tokens): a micro-batch of "
        "the rows not sampled may hold a longer row than the sample's longest"
    )
    line = (
        f"lengths: from {len(rows)} sampled rows of {', '.join(names)} (seed {SEED}; {total} rows to train on): "
        f"tokens mean {mean:.0f}, p99 {tokens[math.ceil(0.99 * len(tokens)) - 1]}, longest {longest} "
        f"({sum(t >= cutoff for t in tokens)} at cutoff_len {cutoff}); images per row "
        f"{sum(row[1] for row in rows) / len(rows):.2f}, {sum(not row[1] for row in rows)} rows without; "
        f"{memory_at}; time at the micro-batch of {batch} padded to its longest row ({padded:.0f} tokens on "
        "average)"
    )
    return Lengths(peak, image_tokens, padded, mean, total, line)
