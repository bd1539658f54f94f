"""A refusal on one rank of a multi-process job (issue 57, item 4): printed once, within seconds, and the other ranks
end instead of waiting in the process group for ``ddp_timeout`` (``llamafactory_hera/job_refusal.py``). Each job is
two plain ranks (tests/refusal_rank.py: the plugin's excepthook, one rank refusing, the other waiting in a gloo
process group with a 600 s timeout) under torchrun, ``accelerate launch`` and ``srun``'s environment without a
launcher (``SLURM_PROCID``, ``SLURM_NTASKS``, ``MASTER_*``; nothing stops a rank that waits)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import free_port, offline_env

RANK = str(Path(__file__).with_name("refusal_rank.py"))
BIN = Path(sys.executable).parent
LINE = "[llamafactory-hera] error: hera_k: 0 is out of range (rank 1). Set hera_k to 1 or more."
WITHIN_S = 15.0  # from the refusal to the job's end (before: 30 s under torchrun, ddp_timeout under srun)


def _check(outputs: list[str], stamps: Path, ended: float) -> None:
    """One line in all; the job ended within seconds of the moment both ranks were up (one refused, one waited)."""
    lines = [line for output in outputs for line in output.splitlines() if "[llamafactory-hera] error: " in line]
    assert lines == [LINE], "\n".join(outputs)[-4000:]
    both = max(float(stamps.with_name(f"{stamps.name}.{rank}").read_text()) for rank in (0, 1))
    assert ended - both < WITHIN_S, f"the job ended {ended - both:.0f} s after both ranks were up"


def _when_both_up(stamps: Path, seconds: float, ranks: list[subprocess.Popen]) -> float:
    """When the later of the two ranks wrote its stamp (within ``seconds``; a rank that ended without one fails)."""
    files, deadline = [stamps.with_name(f"{stamps.name}.{rank}") for rank in (0, 1)], time.time() + seconds
    while not all(file.is_file() for file in files):  # each written whole (tests/refusal_rank.py: os.replace)
        dead = [rank for rank, (proc, file) in enumerate(zip(ranks, files, strict=True))
                if proc.poll() is not None and not file.is_file()]
        assert not dead, f"rank {dead[0]} ended before it was up:\n{ranks[dead[0]].communicate()[0][-3000:]}"
        assert time.time() < deadline, f"the ranks were not up within {seconds:.0f} s"
        time.sleep(0.2)
    return max(float(file.read_text()) for file in files)


def _run(command: list[str], tmp_path: Path) -> tuple[str, float]:
    proc = subprocess.run(command, cwd=tmp_path, env=offline_env(tmp_path), capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 1, proc.stderr[-3000:]
    return proc.stdout + proc.stderr, time.time()


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate launch"])
def test_a_refusal_on_rank_1_ends_a_launched_job_at_once(launcher: str, tmp_path: Path) -> None:
    port, stamps = str(free_port()), tmp_path / "stamps"
    command = ([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", port] if launcher == "torchrun" else
               [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--main_process_port", port, "--mixed_precision", "no", "--dynamo_backend", "no"])
    output, ended = _run([*command, RANK, "1", str(stamps)], tmp_path)
    _check([output], stamps, ended)


@pytest.mark.xfail(strict=True, raises=subprocess.TimeoutExpired,
                   reason="srun tasks without a launcher are not watched (job_refusal.job_of): a rank 0 "
                   "that hosts the store ends with it at a refusal, and every normal end printed c10d's recvValue "
                   "stack on the ranks outliving rank 0 (review of 2026-11-25); open until the store outlives rank 0")
def test_a_refusal_on_rank_1_ends_srun_tasks_at_once(tmp_path: Path) -> None:
    """No launcher stops the waiting rank (``srun`` without ``--kill-on-bad-exit``): it ends because the refusing
    rank set the flag in rank 0's store."""
    port, stamps = str(free_port()), tmp_path / "stamps"
    env = {**offline_env(tmp_path), "SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": port}
    ranks = [subprocess.Popen([sys.executable, RANK, "1", str(stamps)], cwd=tmp_path,
                              env={**env, "SLURM_PROCID": str(rank)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    try:
        both_up = _when_both_up(stamps, 60, ranks)  # both up within ~20 s, then the job ends within WITHIN_S
        # waited for no longer than the claim allows: the open bug fails here in WITHIN_S, not in a minute
        outputs = [rank.communicate(timeout=max(1.0, both_up + WITHIN_S - time.time()))[0] for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
            rank.wait()
    ended = time.time()
    assert [rank.returncode for rank in ranks] == [1, 1], outputs
    _check(outputs, stamps, ended)
