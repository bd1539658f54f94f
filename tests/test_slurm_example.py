"""recipes/slurm/ as SLURM runs it, with stand-ins for ``srun``, ``scontrol`` and ``llamafactory-cli`` on PATH that
record what they were given (docs/multinode.md): the GPU count of a typed ``--gpus-per-node``, ``--cpus-per-task``
passed to srun, the node-local caches of node.sh. Each test runs bash alone (no Python launch)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "recipes" / "slurm"
RECORD = 'printf "%s\\n" "$0 $*" "GPUS_PER_NODE=${GPUS_PER_NODE:-} TMPDIR=${TMPDIR:-} '
RECORD += 'TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-} NPROC_PER_NODE=${NPROC_PER_NODE:-}" >> "$CALLS"\n'


def run(script: Path, tmp: Path, **env: str) -> list[str]:
    """``bash script`` from the repository root with the stand-ins first on PATH; the lines they recorded."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in {"srun": RECORD, "llamafactory-cli": RECORD,
                       "scontrol": 'if [ "$1" = show ]; then echo node0; echo node1; else ' + RECORD + "fi\n"}.items():
        (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body, encoding="utf-8")
        (bin_dir / name).chmod(0o755)
    calls = tmp / "calls.txt"
    full = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "CALLS": str(calls), "SLURM_JOB_ID": "7",
            "SLURM_JOB_NODELIST": "node[0-1]", "SLURM_SUBMIT_DIR": str(tmp), "OUTPUT_DIR": str(tmp / "out"), **env}
    proc = subprocess.run(["bash", str(script)], cwd=ROOT, env=full, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return calls.read_text(encoding="utf-8").splitlines()


def test_the_sbatch_takes_the_gpu_count_of_a_typed_request_and_passes_cpus_per_task_to_srun(tmp_path: Path) -> None:
    calls = run(SLURM / "hera_2nodes.sbatch", tmp_path, SLURM_GPUS_PER_NODE="h100:8", SLURM_CPUS_PER_TASK="24")
    srun = calls.index(next(line for line in calls if line.endswith("/srun --kill-on-bad-exit=1 --cpus-per-task=24 "
                                                                     "bash recipes/slurm/node.sh")))
    assert calls[srun + 1].startswith("GPUS_PER_NODE=8 "), calls
    assert any(line.endswith("/scontrol requeue 7") for line in calls), calls  # not finished: back in the queue


def test_node_sh_keeps_temporary_files_and_tritons_cache_on_the_nodes_scratch(tmp_path: Path) -> None:
    calls = run(SLURM / "node.sh", tmp_path, RECIPE="recipe.yaml", MASTER_ADDR="node0", SLURM_NNODES="2",
                SLURM_NODEID="1", GPUS_PER_NODE="8", NODE_SCRATCH=str(tmp_path / "scratch"))
    scratch = tmp_path / "scratch" / "llamafactory-hera-7"
    assert calls[0].endswith(f"/llamafactory-cli train recipe.yaml output_dir={tmp_path / 'out'}"), calls
    assert calls[1] == f"GPUS_PER_NODE=8 TMPDIR={scratch} TRITON_CACHE_DIR={scratch / 'triton'} NPROC_PER_NODE=8", calls
    assert scratch.is_dir()
