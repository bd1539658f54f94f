"""recipes/slurm/ as SLURM runs it, with stand-ins for ``srun``, ``scontrol``, ``llamafactory-cli`` and ``accelerate``
on PATH that record what they were given (docs/multinode.md): the GPU count of a typed ``--gpus-per-node``,
``--cpus-per-task`` passed to srun, the node-local caches of node.sh, the save signal the job's ``--signal`` line
names (kept beside EXTRA_KEYS, a SAVE_SIGNAL naming another refused), the 72B recipe's FSDP2 launch on each node.
Each test runs bash alone (no Python launch); the two-node runs of these scripts: tests/test_multinode.py."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "recipes" / "slurm"
RECORD = 'printf "%s\\n" "$0 $*" "GPUS_PER_NODE=${GPUS_PER_NODE:-} TMPDIR=${TMPDIR:-} '
RECORD += 'TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-} NPROC_PER_NODE=${NPROC_PER_NODE:-}" "EXTRA_KEYS=${EXTRA_KEYS:-}" >> '
RECORD += '"$CALLS"\n'
# srun that also runs its task as node 1 of 2 (the flags before the command dropped)
SRUN_NODE1 = RECORD + 'while [ "${1#--}" != "$1" ]; do shift; done\nSLURM_NNODES=2 SLURM_NODEID=1 exec "$@"\n'


def run(script: Path, tmp: Path, code: int = 0, srun: str = RECORD, **env: str) -> list[str]:
    """``bash script`` from the repository root with the stand-ins first on PATH (``srun``'s body); the lines they
    recorded (the script's stderr when it exits with ``code`` 1)."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in {"srun": srun, "llamafactory-cli": RECORD, "accelerate": RECORD,
                       "scontrol": 'if [ "$1" = show ]; then echo node0; echo node1; else ' + RECORD + "fi\n"}.items():
        (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body, encoding="utf-8")
        (bin_dir / name).chmod(0o755)
    calls = tmp / "calls.txt"
    full = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "CALLS": str(calls), "SLURM_JOB_ID": "7",
            "SLURM_JOB_NODELIST": "node[0-1]", "SLURM_SUBMIT_DIR": str(tmp), "OUTPUT_DIR": str(tmp / "out"), **env}
    proc = subprocess.run(["bash", str(script)], cwd=ROOT, env=full, capture_output=True, text=True, timeout=60)
    assert proc.returncode == code, proc.stderr
    return proc.stderr.splitlines() if code else calls.read_text(encoding="utf-8").splitlines()


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


def test_extra_keys_keep_the_save_signal_the_jobs_signal_names(tmp_path: Path) -> None:
    """The sbatch's ``--signal=USR1@300`` makes ``hera_save_on_signal=sigusr1`` the ranks' key, and EXTRA_KEYS come
    after it. Before, setting EXTRA_KEYS dropped the key: the job's SIGUSR1 met the default sigterm and ended the job
    with no save and no line."""
    calls = run(SLURM / "hera_2nodes.sbatch", tmp_path, EXTRA_KEYS="hera_watchdog_timeout=600")
    srun = next(index for index, line in enumerate(calls) if " --kill-on-bad-exit=1 " in line)
    assert calls[srun + 2] == "EXTRA_KEYS=hera_save_on_signal=sigusr1 hera_watchdog_timeout=600", calls


def test_a_save_signal_other_than_the_jobs_is_refused_and_none_asked_is_sigterm(tmp_path: Path) -> None:
    """SAVE_SIGNAL naming another signal than the job's ``--signal`` line: one line, exit 1, no srun (the ranks would
    not save on the job's signal). A job script without the line (a partition that preempts with a grace time) saves
    on SIGTERM."""
    [line] = run(SLURM / "hera_2nodes.sbatch", tmp_path, code=1, SAVE_SIGNAL="sigusr2")
    assert line == ("[llamafactory-hera] error: SAVE_SIGNAL=sigusr2, but this job asks SLURM for SIGUSR1 "
                    f"({SLURM / 'hera_2nodes.sbatch'}'s --signal line): the ranks would not save on it. Set "
                    "SAVE_SIGNAL=sigusr1, or change that line.")
    assert not (tmp_path / "calls.txt").exists()
    script = tmp_path / "grace.sbatch"
    script.write_text("".join(line for line in (SLURM / "hera_2nodes.sbatch").read_text().splitlines(keepends=True)
                              if not line.startswith("#SBATCH --signal=")))
    calls = run(script, tmp_path)
    assert "EXTRA_KEYS=hera_save_on_signal=sigterm" in calls, calls


def test_the_72b_fsdp2_job_starts_accelerate_launch_on_each_node(tmp_path: Path) -> None:
    """qwen2_5_72b_hera_fsdp2_2nodes.sbatch: node.sh (run here as node 1 of 2) starts the node's ranks with accelerate
    launch of the FSDP2 config, made the job's: two machines, this node's rank, 16 processes, the first node's
    address, Qwen2.5-VL's layer classes, the recipe with the job's save signal."""
    calls = run(SLURM / "qwen2_5_72b_hera_fsdp2_2nodes.sbatch", tmp_path, srun=SRUN_NODE1)
    [launch] = [line for line in calls if line.split(" ")[0].endswith("/accelerate")]
    assert launch.split(" ")[1:] == [
        "launch", "--config_file", "recipes/accelerate/fsdp2_config.yaml", "--num_machines", "2", "--machine_rank",
        "1", "--num_processes", "16", "--main_process_ip", "node0", "--main_process_port", "29571",
        "--fsdp_transformer_layer_cls_to_wrap", "Qwen2_5_VLDecoderLayer,Qwen2_5_VLVisionBlock", "-m",
        "llamafactory.launcher", "recipes/qwen2_5_72b_hera_fsdp2.yaml", f"output_dir={tmp_path / 'out'}",
        "hera_save_on_signal=sigusr1"], launch
