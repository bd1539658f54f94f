"""GCG's budget (:mod:`.gcg`): what one suffix may cost, the paper's values but the steps; and the source its cached
suffixes and jailbreak results are keyed by. Imports nothing heavy: the command line checks and records them before
torch loads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SUFFIX_TOKENS = 20  # the paper's suffix length, initialised as "! ! ! ..."
SEARCH_WIDTH = 512  # B, the paper's batch of candidates per step
TOP_K = 256  # k, the paper's top-k tokens per position
DEFAULT_STEPS = 250  # per prompt (the paper runs 500 for one behaviour; --gcg-steps)


@dataclass(frozen=True)
class Budget:
    """What one suffix may cost: iterations, candidates per iteration (B), tokens per position (k), suffix length."""

    steps: int = DEFAULT_STEPS
    width: int = SEARCH_WIDTH
    top_k: int = TOP_K
    suffix_tokens: int = SUFFIX_TOKENS
    seed: int = 0


def algorithm_source() -> str:
    """``gcg.py``'s text above its cache section, the algorithm that makes a suffix: what cached suffixes and jailbreak
    results were computed under (the cache and the per-prompt loop change no suffix, so editing them keeps the
    suffixes, minutes each on a 7-8B model)."""
    text = Path(__file__).with_name("gcg.py").read_text(encoding="utf-8")
    return text[: text.index("\n# ---------------------------------------------------------------- cached suffixes")]
