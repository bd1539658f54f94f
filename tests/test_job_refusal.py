"""A refusal on one rank of a multi-process job: printed once, within seconds, and the other ranks
end instead of waiting in the process group for ``ddp_timeout`` (``llamafactory_hera/job_refusal.py``). Each job is
two plain ranks (tests/refusal_rank.py: the plugin's excepthook, one or both ranks refusing, the others waiting in a
gloo process group with a 600 s timeout) under torchrun, ``accelerate launch``, torchrun's environment without its
agent (the job's store hosted by the test as the agent hosts it, but nothing stops a waiting rank: each rank must end
by the refusal path) and ``srun``'s environment without a launcher (``SLURM_PROCID``,
``SLURM_NTASKS``, ``MASTER_*``)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from conftest import free_port, offline_env
from llamafactory_hera import job_refusal
from llamafactory_hera.runtime.errors import RecipeError

RANK = str(Path(__file__).with_name("refusal_rank.py"))
BIN = Path(sys.executable).parent
LINE = "[llamafactory-hera] error: hera_k: 0 is out of range (rank 1). Set hera_k to 1 or more."
TEACHER = ("[llamafactory-hera] error: hera_teacher: 'tiny-dino' loaded with other weights on some ranks (sum, "
           "absolute sum: rank 0: 0, 0; rank 1: 4, 4), so each rank would align to another teacher.")
ADAPTER = "[llamafactory-hera] error: resume_from_checkpoint: the FSDP2 checkpoint's pytorch_model_fsdp.bin holds"
WITHIN_S = 15.0  # from the refusal to the job's end (before: 30 s under torchrun, ddp_timeout under srun)


def _check(outputs: list[str], stamps: Path, ended: float, line: str = LINE) -> None:
    """One line in all (starting with ``line``); the job ended within seconds of the moment both ranks were up (one
    refused, one waited)."""
    lines = [re.sub(r"^\[rank\d\]: ", "", text) for output in outputs for text in output.splitlines()
             if "[llamafactory-hera] error: " in text]  # torch prefixes what a rank prints after its process group
    assert len(lines) == 1 and lines[0].startswith(line), "\n".join(outputs)[-4000:]
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


def _unlaunched(what: str, env: dict[str, str], rank_env: str, tmp_path: Path, within: float = WITHIN_S) -> None:
    """Two ranks of ``refusal_rank.py WHAT`` started by the test, each with ``env`` and its rank in ``rank_env``: no
    launcher stops one; both must end with exit code 1 within ``within`` s of both being up, one line printed."""
    stamps = tmp_path / "stamps"
    ranks = [subprocess.Popen([sys.executable, RANK, what, str(stamps)], cwd=tmp_path,
                              env={**offline_env(tmp_path), **env, rank_env: str(rank), "LOCAL_RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    try:
        both_up = _when_both_up(stamps, 180, ranks)  # up within ~20 s on an idle machine; then ends within WITHIN_S
        # waited for no longer than the claim allows: a rank left waiting fails here in ``within``, not in a minute
        outputs = [rank.communicate(timeout=max(1.0, both_up + within - time.time()))[0] for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
            rank.wait()
    ended = time.time()
    assert [rank.returncode for rank in ranks] == [1, 1], outputs
    _check(outputs, stamps, ended, {"teacher": TEACHER, "adapter": ADAPTER}.get(what, LINE[:LINE.index("(rank ")]))


@pytest.mark.parametrize("what", ["1", "0", "0,1", "teacher", "adapter"])
def test_a_refusal_ends_every_rank_of_a_torchrun_job_without_its_agent(what: str, tmp_path: Path) -> None:
    """torchrun's environment and its store (hosted here), without the agent that would stop the other ranks when one
    fails: the waiting rank ends by the refusal's flag alone, whichever rank refuses (rank 0 alive and waiting while
    rank 1 refuses, and the reverse); where both refuse (the same line: ``0,1``; the teacher's weights differing, every
    rank refusing by :func:`check_same_on_every_rank`) one line is printed; fsdp_adapter's refusal on rank 0, the other
    rank waiting in the broadcast from rank 0, ends both."""
    from torch.distributed import TCPStore

    port = free_port()
    store = TCPStore("127.0.0.1", port, 2, True, timedelta(seconds=60), wait_for_workers=False)  # the agent's
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
           "TORCHELASTIC_RUN_ID": "job-7", "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RESTART_COUNT": "0"}
    _unlaunched(what, env, "RANK", tmp_path)
    del store


@pytest.mark.xfail(strict=True, raises=subprocess.TimeoutExpired,
                   reason="srun tasks without a launcher are not watched (job_refusal.job_of): a rank 0 "
                   "that hosts the store ends with it at a refusal, and every normal end printed c10d's recvValue "
                   "stack on the ranks outliving rank 0 (review of 2026-11-25); open until the store outlives rank 0")
def test_a_refusal_on_rank_1_ends_srun_tasks_at_once(tmp_path: Path) -> None:
    """No launcher stops the waiting rank (``srun`` without ``--kill-on-bad-exit``): it ends because the refusing
    rank set the flag in rank 0's store."""
    env = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    # while open, the waiting rank waits out its ddp_timeout (600 s): 5 s of it shows that as well as WITHIN_S does,
    # and a watched rank ends in about a second (the torchrun cases above), so a fix still turns this xfail strict-red
    _unlaunched("1", env, "SLURM_PROCID", tmp_path, within=5.0)


def _torchrun_env(port: int, rank: int, local_world: int = 2, world: int = 4) -> dict[str, str]:
    """Rank ``rank`` of a torchrun job of ``world`` ranks, ``local_world`` per node (node = rank // local_world)."""
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(local_world), "TORCHELASTIC_RUN_ID": "job-7", "TORCHELASTIC_RESTART_COUNT": "0",
            "RANK": str(rank), "LOCAL_RANK": str(rank % local_world), "GROUP_RANK": str(rank // local_world)}


@pytest.fixture
def agent_store() -> Iterator[int]:
    """The port of a job's c10d store, hosted here as torchrun's agent hosts it; this process's refusal state reset."""
    from torch.distributed import TCPStore

    port = free_port()
    store = TCPStore("127.0.0.1", port, None, True, timedelta(seconds=30), wait_for_workers=False)
    yield port
    job_refusal._stop_watching()
    job_refusal._watching.clear()
    job_refusal._refusing.clear()
    del store


def test_a_refusal_is_printed_by_local_rank_0_of_every_other_node(agent_store: int, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Two nodes of two ranks: rank 1 (node 0) refuses first, prints, tells the others and waits until node 1 has taken
    the line (its end ends torchrun's store); local rank 0 of node 1 prints the same report, whether it watched or
    refused too (before: node 1's log held no line, only torchrun's pointer to "the [llamafactory-hera] error line
    above"); rank 0 (the first's node) and local rank 1 of node 1 stay silent."""
    from torch.distributed import TCPStore

    env = [_torchrun_env(agent_store, rank) for rank in range(4)]
    first: list[tuple[bool, bool]] = []
    refusing = threading.Thread(target=lambda: first.append(job_refusal.announce("the report\n", env[1])))
    started = time.monotonic()
    refusing.start()
    client = TCPStore("127.0.0.1", agent_store, None, False, timedelta(seconds=30), wait_for_workers=False)
    client.wait(["llamafactory_hera/0/" + job_refusal.REFUSED])
    # printed before the flag: the other ranks end once they see it, and torchrun's agent then stops this one (under
    # load the line was lost: the fault chain's full-disk refusal ended without it)
    assert capsys.readouterr().err == "the report\n"
    time.sleep(4 * job_refusal.POLL_S)
    assert refusing.is_alive()  # waiting for node 1 to take the line
    monkeypatch.setattr(os, "_exit", lambda code: sys.exit(code))
    for rank, printed in ((2, "the report\n"), (0, ""), (3, "")):  # each watching
        job_refusal._refusing.clear()
        with pytest.raises(SystemExit):
            job_refusal._watch(job_refusal.job_of(env[rank]))
        assert capsys.readouterr().err == printed, rank
    refusing.join()
    assert first == [(False, True)] and time.monotonic() - started < job_refusal.NODES_S
    assert [job_refusal.announce("the report\n", env[rank]) for rank in (0, 2, 3)] == [(False, True), (True, True),
                                                                                     (False, True)]


def test_a_stock_stages_ranks_start_no_watch(agent_store: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rank's watch polls the store every 0.2 s; when torchrun's agent died first, c10d printed 'recvValue failed'
    and a C++ frame dump in every rank. The start-up hook starts none (a stock stage's rank has none, as without the
    plugin); a method's first check does."""
    from llamafactory_hera.methods import declared_methods
    from llamafactory_hera_patches.recipe.raw_checks import checked_run

    for key, value in _torchrun_env(agent_store, 1).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv(job_refusal.TRACEBACK_ENV, raising=False)
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    job_refusal._stop_watching()
    job_refusal._watching.clear()
    job_refusal._refusing.clear()
    job_refusal.install()
    assert not job_refusal._watching
    hera = next(method for method in declared_methods() if method.stage == "hera")
    with pytest.raises(RecipeError):
        checked_run(hera, {"hera_heads": ["L0H0"]}, {"stage": "hera", "fp16": True, "bf16": True}, machine=False)
    assert [thread.is_alive() for thread in job_refusal._watching] == [True]


@pytest.mark.parametrize(("env", "named"), [({"NNODES": "2"}, "NNODES=2"),
                                            ({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"},
                                             "WORLD_SIZE=4 over LOCAL_WORLD_SIZE=2"),
                                            ({"NNODES": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}, None),
                                            ({"NNODES": "1:2"}, None), ({}, None)])
def test_several_nodes_are_told_by_nnodes_or_the_world_beyond_the_node(env: dict[str, str], named: str | None) -> None:
    assert job_refusal.several_nodes(env) == named


def test_a_job_is_one_node_unless_its_ranks_say_otherwise() -> None:
    """The first refusing rank waits for each other node to take the line: their count is the world over the node's
    ranks (``LOCAL_WORLD_SIZE``), one node where that is not given (no wait for nodes that do not exist)."""
    env = {"WORLD_SIZE": "4", "RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500",
           "TORCHELASTIC_RUN_ID": "job"}
    assert [job_refusal.job_of({**env, **more}).nodes for more in ({}, {"LOCAL_WORLD_SIZE": "2"},
                                                                   {"LOCAL_WORLD_SIZE": "4"})] == [1, 2, 1]
