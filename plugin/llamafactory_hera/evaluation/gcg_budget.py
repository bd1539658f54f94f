"""GCG's budget and the source its caches are keyed by. Light imports: checked before torch loads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SUFFIX_TOKENS = 20  # the paper's suffix length
SEARCH_WIDTH = 512  # B, candidates per step
TOP_K = 256  # k, top-k tokens per position
DEFAULT_STEPS = 250  # per prompt (the paper: 500 for one behaviour)


@dataclass(frozen=True)
class Budget:
    steps: int = DEFAULT_STEPS
    width: int = SEARCH_WIDTH
    top_k: int = TOP_K
    suffix_tokens: int = SUFFIX_TOKENS
    seed: int = 0


def algorithm_source() -> str:
    """``gcg.py`` above its cache section: editing the cache code below keeps the cached suffixes."""
    text = Path(__file__).with_name("gcg.py").read_text(encoding="utf-8")
    return text[: text.index("\n# ---------------------------------------------------------------- cached suffixes")]
