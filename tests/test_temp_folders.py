"""Commands leave no folders behind in the system's temporary directory (select ran thousands of times in CI and
left one ``hera_select_*`` folder per call)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest


def test_reading_a_recipes_data_creates_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from llamafactory_hera_patches.tools.model_data import training_args_for_reading

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    training_args_for_reading(0)  # the first call's imports may write their own caches (torch's inductor folder)
    before = sorted(tmp_path.iterdir())
    for seed in (1, 2):
        assert training_args_for_reading(seed).seed == seed
    assert sorted(tmp_path.iterdir()) == before
    assert not any(p.name.startswith(("hera_select_", "llamafactory_hera")) for p in before)
