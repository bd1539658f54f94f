"""What one head selection produces (:class:`SelectionResult`): every head's score, the chosen heads and everything
needed to reproduce them. Its own module, so that ``select`` (which makes one) and ``recipe_write`` (which writes one)
both import it and neither imports the other for it."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

RECORD_VERSION = 1


@dataclass
class SelectionResult:
    """Scores of every head and the chosen ones, with everything needed to reproduce them."""

    scores: list[list[float]]  # [L][H] MKNN
    selected: list[str]
    strategy: str
    ranking: list[dict[str, Any]]  # every head, least aligned first
    settings: dict[str, Any]
    identity: dict[str, Any]
    versions: dict[str, str]
    num_pairs: int
    duration_s: float
    data_notes: dict[str, Any] = field(default_factory=dict)  # distinct images, dropped duplicates, caption ties
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    record_version: int = RECORD_VERSION

    def to_json(self) -> str:
        """The JSON record."""
        return json.dumps(asdict(self), indent=2)
