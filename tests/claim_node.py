"""One run on a simulated node, for tests/test_claim_nodes.py (not a test module).

``python claim_node.py FOLDER HOST [--lease S] [--refresh S] [--go FILE] [--hold S] [--until FILE] [--after S]
[--pause S]``
claims FOLDER the way a run does (:func:`run_claim.claimed`), as a process of host HOST (``socket.gethostname``
answers HOST), its job read from the environment as on a cluster (``TORCHELASTIC_RUN_ID``, ``MASTER_*``, ``RANK``,
``SLURM_*``), the lease and the refresh interval shortened to seconds. With --go it prints ``ready`` and waits for
FILE to appear (to race others). It prints ``claimed``, ``shared`` or the refusal, holds the folder for --hold
seconds (the run; with --until, until FILE appears, --hold at most), then lives on for --after seconds (a rank whose
run has returned while another rank still saves) and exits. --pause: after each read of the claim's files the
process pauses for S seconds (descheduled on a busy node: races among runs are wide).
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from pathlib import Path


def _paused(seconds: float, claim: str) -> None:
    """Each read of the claim's files pauses this process for ``seconds`` after it (descheduled on a busy node)."""
    read_text = Path.read_text

    def paused(self: Path, *args: object, **kwargs: object) -> str:
        text = read_text(self, *args, **kwargs)  # type: ignore[arg-type]
        if self.name.startswith(claim):
            time.sleep(seconds)
        return text

    Path.read_text = paused  # type: ignore[method-assign]


def _hold(seconds: float, until: Path | None) -> None:
    """The run: ``seconds``, or until ``until`` appears (a test ends it once it has seen what it waits for)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not (until is not None and until.exists()):
        time.sleep(0.01 if until is not None else max(0.0, deadline - time.monotonic()))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("host")
    parser.add_argument("--go", type=Path, default=None)
    parser.add_argument("--until", type=Path, default=None)
    for option in ("--lease", "--refresh", "--hold", "--after", "--pause"):
        parser.add_argument(option, type=float, default=None)
    args = parser.parse_args()
    socket.gethostname = lambda: args.host  # type: ignore[assignment]

    from llamafactory_hera.runtime import run_claim
    from llamafactory_hera.runtime.errors import RecipeError

    if args.lease is not None:
        run_claim.LEASE_SECONDS = args.lease
    if args.refresh is not None:
        run_claim._REFRESH_SECONDS = args.refresh
    if args.pause is not None:
        _paused(args.pause, run_claim.CLAIM)
    if args.go is not None:  # to race others: ready, then off when the file appears
        print("ready", flush=True)
        while not args.go.exists():
            time.sleep(0.005)
    try:
        with run_claim.claimed({"output_dir": str(args.folder)}, "sft"):
            mine = run_claim._held.get(args.folder.resolve() / run_claim.CLAIM)
            print("claimed" if mine is not None else "shared", flush=True)
            _hold(args.hold or 0.0, args.until)
    except RecipeError as error:
        print(error, flush=True)
        return 1
    time.sleep(args.after or 0.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
