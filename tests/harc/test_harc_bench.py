"""HARC's step counted against SFT at LLaMA-Factory's defaults (bench/step_counts.py --method harc), and the A/B
bench's twin (bench/harc.py) as users run SFT."""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from pathlib import Path

from dist_runs import run_python

from conftest import REPO, offline_env

BENCH = REPO / "bench"


def test_harc_step_makes_sfts_checkpoint_calls_and_names_its_extra_ops(tmp_path: Path) -> None:
    """One optimizer step of the real run_exp on an 8-layer Llama, counted: HARC switches no layer's checkpointing, so
    its step makes SFT's checkpoint.py calls (it used to switch every layer: +12,208 on this preset, then its 2
    coupled layers: +3,052), and its extra ops are those of its named parts (the KL reference's second
    forward, the residual capture, each term) but for the terms' backward."""
    counts = tmp_path / "counts.json"
    # forked from the warm process (tests/dist_runs.py): the script's work, not its imports
    proc = run_python(BENCH / "step_counts.py", ["--method", "harc", "--check", "--json", str(counts), "--assets",
                                                 str(tmp_path)], cwd=tmp_path, env=offline_env(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(counts.read_text())
    sft, non_reentrant, harc = (rows[k] for k in ("sft", "sft_nonreentrant", "harc"))
    every_layer = non_reentrant["checkpoint_calls"] - sft["checkpoint_calls"]
    # 224 on this preset (3,276 with the 2 coupled layers switched; 12,432 non-reentrant in every layer)
    assert every_layer > 0 and harc["checkpoint_calls"] == sft["checkpoint_calls"], rows
    assert harc["section_checkpoint_calls"] == {}, rows  # the KL reference's forward (no grad) checkpoints nothing
    sections = harc["sections"]
    assert sections["second forward: the KL reference (adapter off, retain rows)"] > sum(
        ops for name, ops in sections.items() if "reference" not in name), sections  # the largest part
    assert {"coupling terms (forward)", "KL term (forward)", "refusal CE term (forward)",
            "residual capture (hooks, read)"} <= sections.keys(), sections
    assert re.search(r"^SFT \(LLaMA-Factory defaults\)\s+12\s+[\d,]+\s+[\d,]+\s+[\d,]+$", proc.stdout, re.M)
    assert "FAIL" not in proc.stdout, proc.stdout[-3000:]


def test_the_ab_bench_twin_is_sft_at_llamafactory_defaults() -> None:
    spec = importlib.util.spec_from_file_location("bench_harc", BENCH / "harc.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCH))  # harc.py imports runs.py beside it
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    args = argparse.Namespace(steps=2, extract=8, validate=4, refresh_at=1, device="cpu")
    for stage in ("sft", "harc"):
        recipe = module.recipe(Path("/x"), stage, "/out", args)
        assert "use_reentrant_gc" not in recipe and "disable_gradient_checkpointing" not in recipe, recipe
