"""The watchdog's campaign launched (tests/test_watch_campaign.py): every case at once, each a job of two gloo ranks on
this CPU, on one node or on two simulated nodes, forked from this process, which imported torch and the plugin's
watchdog once (tests/watch_campaign_case.py: what each rank runs).

``python watch_campaign_launch.py CASES.json FOLDER`` writes, per case, ``FOLDER/CASE/nodeK.log`` (that node's ranks'
output: its log) and ``FOLDER/results.json``: per case and node, its ranks' exit codes, the watchdog's lines, when its
log got the first one and when the fault acted (epoch seconds), and whether the case outlived its deadline (killed).

A node is torchrun's part as tests/warm_server.py plays it: an agent process (a session of its own) forks its ranks
with torchrun's variables (tests/warm_launch.py ``torchrun_env``), node 0's agent hosts the job's TCPStore, and a rank
that fails ends the node's others (SIGTERM, then SIGKILL after :data:`GRACE_S`). Two simulated nodes as
tests/test_multinode.py simulates them: each node's agent in a UTS namespace of its own (its host name ``nodeK``), with
its own ``HOME`` and ``TMPDIR``, ``output_dir`` shared, one rank a node. A case's ``freeze_node``: the
node whose rank stopped itself stops whole (its agent too: a hung host), and thaws once the other node ended.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import re
import resource
import select
import signal
import socket
import sys
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist
from warm_launch import torchrun_env
from watch_campaign_case import Rank

STAGGER_S = 0.4  # between two cases' starts: 34 ranks connecting at once on 2 cores miss a watchdog's store connect
GRACE_S = 5.0  # a rank still running this long after another failed is killed (torchrun waits 30 s)
CLONE_NEWUTS = 0x04000000
PR_SET_CHILD_SUBREAPER = 36
LINE = re.compile(r"watchdog: .*")
AT = re.compile(r"\[campaign\] rank \d+: (?:SIGSTOP|HANG) .* at (\d+\.\d+)")


def main() -> int:
    cases = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    folder = Path(sys.argv[2])
    gc.freeze()  # the ranks' collections walk what they made, not the imports: fewer pages copied
    # ranks of a node killed at its deadline come here to be reaped (their CPU time counted), not to init
    ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1)
    started: dict[str, float] = {}
    nodes: dict[str, list[int]] = {}
    for case in sorted(cases, key=lambda case: -float(case["deadline"])):  # the longest first
        (folder / case["name"]).mkdir(parents=True, exist_ok=True)
        port = free_port()
        count = int(case.get("nodes", 1))
        started[case["name"]] = time.time()
        nodes[case["name"]] = [fork(node, case, k, count, folder, port) for k in range(count)]
        time.sleep(STAGGER_S)
    ended: dict[int, int] = {}
    killed: set[str] = set()
    agents = {pid for pids in nodes.values() for pid in pids}
    while not agents <= ended.keys():
        with contextlib.suppress(ChildProcessError):
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid:
                ended[pid] = os.waitstatus_to_exitcode(status)
        for case in cases:
            pids = nodes[case["name"]]
            if case.get("freeze_node") and pids[0] in ended and pids[1] not in ended:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pids[1], signal.SIGCONT)  # the hung host comes back
            if time.time() - started[case["name"]] > float(case["deadline"]) and any(pid not in ended for pid in pids):
                killed.add(case["name"])
                for pid in pids:
                    for kill in (signal.SIGKILL, signal.SIGCONT):
                        with contextlib.suppress(ProcessLookupError):
                            os.killpg(pid, kill)
        time.sleep(0.05)
    with contextlib.suppress(ChildProcessError):  # orphans of the killed nodes
        while os.waitpid(-1, 0)[0]:
            pass
    results = {}
    for case in cases:
        name = case["name"]
        reports = [folder / name / f"node{k}.json" for k in range(len(nodes[name]))]
        results[name] = {"killed": name in killed, "started": started[name],
                         "nodes": [json.loads(path.read_text()) if path.is_file() else {} for path in reports]}
    used = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    results["cpu_s"] = round(sum(usage.ru_utime + usage.ru_stime for usage in used), 1)
    (folder / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    return 0


def fork(child: Any, *args: Any) -> int:
    """``child(*args)`` in a child process; its pid."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            child(*args)
            code = 0
        except BaseException:  # noqa: BLE001 - said in the case's own log
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return pid


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def own_host(name: str) -> None:
    """This process and its children on a host of their own (a UTS namespace; root)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWUTS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUTS)")
    socket.sethostname(name)


def rank_env(case: dict[str, Any], k: int, count: int, home: Path, port: int) -> list[dict[str, str]]:
    """The environment of node ``k``'s ranks (of ``count`` nodes, two ranks in all)."""
    envs = []
    for local in range(2 // count):
        rank = k * (2 // count) + local
        env = {**os.environ, **torchrun_env(rank, 2, port)}
        env.update(LOCAL_RANK=str(local), GROUP_RANK=str(k), LOCAL_WORLD_SIZE=str(2 // count),
                   GROUP_WORLD_SIZE=str(count), GLOO_SOCKET_IFNAME="lo", HOME=str(home / "home"),
                   TMPDIR=str(home / "tmp"))
        envs.append(env)
    return envs


def node(case: dict[str, Any], k: int, count: int, folder: Path, port: int) -> None:
    """Node ``k``'s agent: forks its ranks, hosts the store (node 0), writes its log, reports."""
    os.setsid()
    if count > 1:
        own_host(f"node{k}")
    home = folder / case["name"] / f"node{k}"
    for sub in ("home", "tmp"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    output_dir = folder / case["name"] / "out"
    output_dir.mkdir(parents=True, exist_ok=True)
    ranks: dict[int, int] = {}  # pid -> rank
    pipes: dict[int, bytes] = {}  # read end -> what is left of its last line
    for env in rank_env(case, k, count, home, port):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            run_rank(case, env, write, output_dir)
        os.close(write)
        ranks[pid] = int(env["RANK"])
        pipes[read] = b""
    store = dist.TCPStore("127.0.0.1", port, 2, True, timedelta(minutes=5), wait_for_workers=False) if k == 0 else None
    report = {"codes": {}, "lines": [], "line_at": None, "fault_at": None}
    reported = folder / case["name"] / f"node{k}.json"
    failed_at = None
    with open(folder / case["name"] / f"node{k}.log", "w", encoding="utf-8") as log:
        while pipes or len(report["codes"]) < len(ranks):
            lines = read_lines(pipes)
            changed = bool(lines)
            for line in lines:
                log.write(line + "\n")
                log.flush()
                if found := LINE.search(line):
                    report["lines"].append(found[0])
                    report["line_at"] = report["line_at"] or time.time()
                if found := AT.search(line):
                    report["fault_at"] = float(found[1])
                    if "SIGSTOP" in line and case.get("freeze_node"):
                        reported.write_text(json.dumps(report), encoding="utf-8")
                        os.kill(os.getpid(), signal.SIGSTOP)  # the whole node: a hung host
            with contextlib.suppress(ChildProcessError):
                pid, status = os.waitpid(-1, os.WNOHANG)
                if pid in ranks:
                    report["codes"][ranks[pid]] = os.waitstatus_to_exitcode(status)
                    changed = True
                    if report["codes"][ranks[pid]] != 0 and failed_at is None:
                        failed_at = time.time()
                        signal_others(ranks, report["codes"], signal.SIGTERM)
            if failed_at is not None and time.time() - failed_at > GRACE_S:
                signal_others(ranks, report["codes"], signal.SIGKILL)
            if changed:  # as it goes: a case killed at its deadline still reports
                reported.write_text(json.dumps(report), encoding="utf-8")
    reported.write_text(json.dumps(report), encoding="utf-8")
    del store


def read_lines(pipes: dict[int, bytes]) -> list[str]:
    """The complete lines the ranks wrote since the last call (a closed pipe's rest too)."""
    lines: list[str] = []
    if not pipes:
        time.sleep(0.05)
        return lines
    for read in select.select(list(pipes), [], [], 0.1)[0]:
        chunk = os.read(read, 65536)
        text = pipes[read] + chunk
        done = text.split(b"\n")
        pipes[read] = done.pop()  # the line not ended yet
        if not chunk:
            done.append(pipes.pop(read))
            os.close(read)
        lines += [part.decode("utf-8", "replace") for part in done if part]
    return lines


def signal_others(ranks: dict[int, int], codes: dict[int, int], kill: signal.Signals) -> None:
    for pid, rank in ranks.items():
        if rank not in codes:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, kill)
                if kill == signal.SIGKILL:
                    os.kill(pid, signal.SIGCONT)


def run_rank(case: dict[str, Any], env: dict[str, str], write: int, output_dir: Path) -> None:
    """One rank: never returns."""
    code = 1
    try:
        os.dup2(write, 1)
        os.dup2(write, 2)
        os.environ.clear()
        os.environ.update(env)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        # Python 3.11's fork keeps the parent's native thread id (3.12 sets the child's): the watchdog's look at the
        # main thread's CPU time (/proc/self/task/ID) would read no thread, as it does not in a started interpreter
        threading.current_thread()._set_native_id()
        Rank(case, output_dir).run()
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    except BaseException:  # noqa: BLE001 - said in the node's log, as an interpreter says it
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
