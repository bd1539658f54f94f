"""What the training engine of a subprocess run really was, from tests/engine_evidence/sitecustomize.py."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

EVIDENCE_HOOK = Path(__file__).resolve().parent / "engine_evidence"
ZERO3_CONFIG = Path(__file__).resolve().parent.parent / "recipes" / "deepspeed" / "ds_z3_config.json"


def zero3_partitioning_everything(folder: Path) -> str:
    """The shipped ZeRO-3 config with ``stage3_param_persistence_threshold: 0``, written in ``folder``: every parameter
    partitioned, as real adapters are (lora_rank 8 on a 4096-wide o_proj), where the tiny models' stay whole under the
    stock "auto" threshold (10 x hidden size)."""
    config = json.loads(ZERO3_CONFIG.read_text(encoding="utf-8"))
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = folder / "ds_z3_partition_all.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    return str(path)


def evidence_env(folder: Path) -> dict[str, str]:
    """Environment keys that make every rank write its engine evidence into ``folder``."""
    return {"HERA_TEST_ENGINE_EVIDENCE": str(folder),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(EVIDENCE_HOOK), os.environ.get("PYTHONPATH")]))}


def read_evidence(folder: Path, ranks: int) -> list[dict[str, Any]]:
    files = sorted(folder.glob("rank*.json"))
    assert len(files) == ranks, f"engine evidence of {len(files)} rank(s), expected {ranks}: {files}"
    return [json.loads(path.read_text(encoding="utf-8")) for path in files]


def assert_engine(evidence: list[dict[str, Any]], zero_stage: int | None) -> None:
    """Every rank ran under DeepSpeed ZeRO ``zero_stage`` (None: plain DDP, no DeepSpeed); under ZeRO-3 the o_proj
    weight outside a gather is the partitioned placeholder (numel 0, a ds_id), under ZeRO-2 and DDP it is whole."""
    for record in evidence:
        if zero_stage is None:
            assert not record["is_deepspeed_enabled"] and record["engine"] != "DeepSpeedEngine", record
            assert record["o_proj_numel"] > 0 and record["o_proj_ds_id"] is None, record
            continue
        assert record["is_deepspeed_enabled"] and record["engine"] == "DeepSpeedEngine", record
        assert record["plugin_zero_stage"] == zero_stage and record["engine_zero_stage"] == zero_stage, record
        if zero_stage == 3:
            assert record["o_proj_numel"] == 0 and record["o_proj_ds_id"] is not None, record
        else:
            assert record["o_proj_numel"] > 0 and record["o_proj_ds_id"] is None, record
