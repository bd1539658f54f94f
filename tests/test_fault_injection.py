"""A killed, preempted or disk-full HeRA run on two CPU ranks loses nothing (docs/hera.md, "Killed, preempted, disk
full"): faults at seeded random points (tests/faults.py, tests/fault_injection/), each followed by a rerun with
``resume_from_checkpoint: true``; the last rerun ends with the adapter and temperature of the run never stopped, bit
for bit. One chain per engine, three faults each (N faults cost N + 1 launches; the reference shares the first):

- DDP (torchrun): SIGKILL in a forward or an optimizer step, SIGKILL in the teacher's pass before step 1 (its rerun
  continues from the rows kept), a full disk at a save (one named line; the earlier whole checkpoint is what the
  next rerun takes);
- FSDP2 (accelerate launch): SIGKILL inside a checkpoint save (a file not written or half-written, before or after
  the marker, amid the rotation), SIGTERM to both ranks (a whole checkpoint, exit 0, the line saying how to resume),
  SIGKILL in a forward or an optimizer step.

The seed is printed (``HERA_FAULT_SEED`` repeats a run). ``HERA_FAULT_CAMPAIGN=N`` (with ``-m faults``) runs a campaign
of N more random faults over both engines instead, and prints the table: kills tried, runs that ended equal, refused
by name, lost.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any

import pytest
from faults import Link, ended_equal, random_fault, run_chain
from fsdp_checks import assert_fsdp2

pytestmark = pytest.mark.faults
SEED = int(os.environ.get("HERA_FAULT_SEED") or time.time_ns() % 100_000)


def _chain(engine: str, assets: Any, tmp: Path, faults: list[dict[str, Any]]) -> list[Link]:
    print(f"HERA_FAULT_SEED={SEED} {engine}: {faults}")
    reference, links = run_chain(engine, assets, tmp, faults)
    said = [(link.fault, link.outcome, link.code) for link in links]
    assert links[-1].outcome == "finished", (SEED, said, links[-1].printed[-6000:])
    assert not (bad := ended_equal(reference, tmp / "chain" / "out")), (SEED, said, bad[:5])
    return links


def test_ddp_killed_in_a_step_and_in_the_teachers_pass_and_on_a_full_disk_ends_as_never_stopped(
        assets: Any, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    step = {**random_fault(rng, rng.choice(["forward", "optimizer"])), "step": 2}  # after a whole checkpoint
    # after a batch kept, and before the killed rank's last (4 batches a rank): rows left for the rerun to continue
    teacher = {**random_fault(rng, "precompute"), "at": rng.randint(2, 3)}
    full = {"point": "enospc", "rank": rng.randrange(2), "at": rng.randint(1, 3), "save": 1}
    links = _chain("ddp", assets, tmp_path, [step, teacher, full])
    assert [link.outcome for link in links] == ["killed", "killed", "full", "finished"], links
    assert "continuing from " in links[2].printed  # the rows the killed pass kept
    [line] = {line for line in links[2].printed.splitlines() if "error: disk full: the checkpoint " in line}
    assert "is kept, and is what the same command resumes from" in line, line


def test_fsdp2_killed_in_a_save_preempted_and_killed_in_a_step_ends_as_never_stopped(
        assets: Any, tmp_path: Path) -> None:
    rng = random.Random(SEED + 1)
    # in the second save (a whole checkpoint-1 to resume from; the SIGTERM's stop before the last step): at a write
    # of rank 0 (it writes every file but an RNG state), at the marker, or amid the first rotation
    save = {**random_fault(rng, "write"), "save": 2, "rank": 0} if rng.random() < 0.5 else random_fault(rng, "marker")
    save["at"] = 1 if save.get("when") == "rotate" else save["at"] if save["point"] == "write" else 2
    sigterm = {"point": "step", "signal": "sigterm", "rank": rng.randrange(2), "at": 1}
    links = _chain("fsdp2", assets, tmp_path, [save, sigterm,
                                                {**random_fault(rng, rng.choice(["forward", "optimizer"])), "step": 1}])
    assert [link.outcome for link in links] == ["killed", "stopped", "killed", "finished"], links
    assert "SIGTERM to 2 ranks" in links[1].printed
    said = [line for line in links[1].printed.splitlines() if "SIGTERM: saved the whole checkpoint" in line]
    assert len(said) == 1 and said[0].endswith("run the same command again."), said
    assert_fsdp2(tmp_path / f"link{len(links) - 1}", {"load", "step", "save"})


@pytest.mark.skipif(not os.environ.get("HERA_FAULT_CAMPAIGN"), reason="a campaign: HERA_FAULT_CAMPAIGN=N kills")
def test_campaign_of_random_kills_loses_no_run(assets: Any, tmp_path: Path) -> None:
    """Chains of up to 5 random SIGKILLs (any point, any rank), DDP and FSDP2 in turn, until N kills happened. Each
    kill counts as refused by name (its rerun ended with the one "nothing to resume" line, and the folder held no
    whole checkpoint to resume), equal (its chain ended bit for bit as the run never stopped) or lost (anything else:
    a refusal with a whole checkpoint at hand included)."""
    wanted, rng, rows, chain = int(os.environ["HERA_FAULT_CAMPAIGN"]), random.Random(SEED), [], 0
    while len(rows) < wanted:
        engine, faults = ("ddp", "fsdp2")[chain % 2], [random_fault(rng) for _ in range(min(5, wanted - len(rows)))]
        reference, links = run_chain(engine, assets, tmp_path / f"chain{chain}", faults)
        equal = links[-1].outcome == "finished" and not ended_equal(reference, tmp_path / f"chain{chain}" / "chain"
                                                                     / "out")
        for index, link in enumerate(links):
            if link.outcome == "killed":
                rerun = links[index + 1] if index + 1 < len(links) else None
                after = rerun.outcome if rerun else "none"
                named = rerun is not None and not rerun.whole_before and "there is nothing to resume" in rerun.printed
                rows.append((engine, chain, link.fault, after,
                             ("refused" if named else "lost") if after == "refused" else "equal" if equal else "lost"))
        print(f"chain {chain} ({engine}, ended equal: {equal}): "
              f"{[(link.fault, link.outcome, round(link.seconds)) for link in links]}", flush=True)
        chain += 1
    table = {name: sum(row[-1] == name for row in rows) for name in ("equal", "refused", "lost")}
    print(f"HERA_FAULT_SEED={SEED}: kills tried {len(rows)}, {table}")
    for row in rows:
        print(row)
    assert table["lost"] == 0, rows
