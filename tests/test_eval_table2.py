"""The stage chain each run record holds (issue 33, section 4), read from the records a compose and two runs left.

In-process, no model: records are written as training writes them."""

from __future__ import annotations

import json
from pathlib import Path

from llamafactory_hera_patches import run_record


def _trained(folder: Path, stage: str, model: Path) -> Path:
    """A finished full run of ``stage`` from ``model``, its record written as training writes it."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"vision_config": {}}), encoding="utf-8")
    path = run_record.write_started(folder, stage, {"model_name_or_path": str(model), "template": "qwen3_llava"})
    run_record.write_ended(path, None)
    return folder


def _chains(tmp_path: Path, llm: str) -> tuple[Path, Path]:
    """compose (``llm`` + SigLIP2) -> HeRA stage 1 -> HeRA stage 2, and its SFT twin of both stages."""
    composed = tmp_path / "composed"
    composed.mkdir()
    (composed / run_record.COMPOSE_RECORD).write_text(json.dumps({"llm": llm, "vision":
                                                                  "google/siglip2-so400m-patch14-384"}))
    hera = _trained(tmp_path / "s2" / "hera", "hera", _trained(tmp_path / "s1" / "hera", "hera", composed))
    sft = _trained(tmp_path / "s2" / "sft", "sft", _trained(tmp_path / "s1" / "sft", "sft", composed))
    return hera, sft


def test_the_run_record_holds_the_stage_chain(tmp_path: Path) -> None:
    hera, _ = _chains(tmp_path, "Qwen/Qwen3-8B")
    chain = run_record.read_record(hera / run_record.RUN_RECORD)["chain"]
    assert chain == [{"compose": str((tmp_path / "composed").resolve()), "llm": "Qwen/Qwen3-8B",
                      "vision": "google/siglip2-so400m-patch14-384"},
                     {"stage": "hera", "output_dir": str((tmp_path / "s1" / "hera").resolve())},
                     {"stage": "hera", "output_dir": str(hera.resolve())}]
    from_hub = _trained(tmp_path / "lora", "sft", Path("Qwen/Qwen3-VL-8B-Instruct"))  # no record: starts here
    assert run_record.read_record(from_hub / run_record.RUN_RECORD)["chain"] == [
        {"stage": "sft", "output_dir": str(from_hub.resolve())}]
    (tmp_path / "s1" / "hera" / "checkpoint-5").mkdir()  # stage 2 from a checkpoint of stage 1: stage 1's chain
    again = _trained(tmp_path / "s2" / "from-checkpoint", "hera", tmp_path / "s1" / "hera" / "checkpoint-5")
    assert run_record.read_record(again / run_record.RUN_RECORD)["chain"][:2] == chain[:2]
