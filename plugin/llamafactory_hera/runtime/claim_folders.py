"""What other modules read of the ``output_dir`` claim (:mod:`.run_claim`): the claim file's name, and the output
folders this process's claim created."""

from __future__ import annotations

from pathlib import Path

CLAIM = "llamafactory_hera_claim.json"
made: set[Path] = set()  # resolved; run_claim.claimed adds them for the run


def made_by_claim(folder: Path) -> bool:
    """Whether ``folder`` exists only because this process's claim made it (checks before the parse then call it
    missing)."""
    return folder.expanduser().resolve() in made
