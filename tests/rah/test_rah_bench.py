"""bench/rah.py runs and prints its ratio (the figures themselves are in bench/README.md, never asserted)."""

from __future__ import annotations

from pathlib import Path

from dist_runs import run_python

from conftest import REPO, offline_env


def test_rah_bench_script_prints_the_ratio(tmp_path: Path) -> None:
    # one thread and the unused packages hidden, as the suite's other processes (offline_env): 38 CPU s, was 82; forked
    # from the warm process (tests/dist_runs.py): the script's work, not its imports
    proc = run_python(REPO / "bench" / "rah.py", ["--repeats", "1", "--samples", "4", "--probe", "1", "--kl", "1",
                                                  "--preset", "qwen2.5-vl-7b-smoke", "--assets", str(tmp_path)],
                      cwd=tmp_path, env=offline_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "repeat 1/1 passes" in proc.stdout and "wall time (s), median" in proc.stdout
    assert "probe sweeps" in proc.stdout and "target <= 1.3 on CPU" in proc.stdout
