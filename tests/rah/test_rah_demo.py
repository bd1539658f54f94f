"""``python -m llamafactory_hera.demo --method rah`` (what ``python3 dev.py demo --method rah`` runs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO, offline_env


def test_rah_demo_calibrates_and_prints_its_outputs_and_next_steps(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    command = [sys.executable, "-m", "llamafactory_hera.demo", "--method", "rah", "--family", "llava", "--output",
               str(out), "--assets", str(REPO / ".hera_assets" / "tests")]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, env=offline_env(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "RAH-LoRA demo finished" in proc.stdout and "--adapter_name_or_path" in proc.stdout
    assert "loosened thresholds" in proc.stdout
    assert "--do_sample false" in proc.stdout and f"eval {out / 'rah' / 'run'} --base --tasks demo" in proc.stdout
    profile = json.loads((out / "rah" / "run" / "rah_profile.json").read_text())
    assert profile["summary"]["calibrated"] >= 1 and (out / "rah" / "run" / "adapter_model.safetensors").is_file()
