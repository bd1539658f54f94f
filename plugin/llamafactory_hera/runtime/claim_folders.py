"""What other modules read of the ``output_dir`` claim (:mod:`.run_claim`) without its machinery: the claim file's
name, and the output folders this process's claim created (they did not exist before the run).
"""

from __future__ import annotations

from pathlib import Path

CLAIM = "llamafactory_hera_claim.json"
made: set[Path] = set()  # resolved folders, added by run_claim.claimed for the run's duration


def made_by_claim(folder: Path) -> bool:
    """Whether ``folder`` exists only because this process's claim made it (a check before the parse then says the
    folder did not exist)."""
    return folder.expanduser().resolve() in made
