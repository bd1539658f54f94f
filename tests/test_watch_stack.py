"""What the watchdog reads off the run's main thread while it loads (llamafactory_hera/training/watch_stack.py):
a thread that works moves, one blocked does not, one blocked in ``torch.distributed`` is in a collective (a real
gloo barrier that waits for a rank that never comes), and a progress bar's count is a move."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from conftest import free_port, offline_env
from llamafactory_hera.training.watch_stack import MainThread


def _thread(target: object) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    time.sleep(0.2)
    return thread


def test_a_working_thread_moves_and_a_blocked_one_does_not() -> None:
    stop = threading.Event()

    def work() -> None:
        total = 0
        while not stop.is_set():
            total += sum(range(1000))

    worker = _thread(work)
    looked = MainThread(worker)
    looked.look()
    moves = 0
    for _ in range(10):
        time.sleep(0.1)  # its loop calls sum() from one line: the CPU time it uses tells that it moves
        moves += looked.look()
    assert moves >= 5 and not looked.in_collective
    stop.set()

    blocked = threading.Event()
    sleeper = _thread(lambda: blocked.wait(30))
    looked = MainThread(sleeper)
    looked.look()
    assert not any(looked.look() for _ in range(5)) and not looked.in_collective
    bar = tqdm(total=10, disable=False, file=open("/dev/null", "w"))  # any live bar's count is the process's progress
    looked.look()
    bar.update(1)
    assert looked.look() and not looked.look()
    bar.close()
    blocked.set()


def test_a_thread_waiting_on_a_pools_busy_worker_moves() -> None:
    """As transformers' loader: the thread waits on a future while a pool's worker reads the shards (here: counts);
    the worker's CPU time is the thread's progress. Once the worker is done, the waiting thread stands still."""
    stop = threading.Event()

    def busy() -> None:
        total = 0
        while not stop.is_set():
            total += sum(range(1000))

    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(busy)
        waiter = _thread(lambda: future.exception(30))
        looked = MainThread(waiter)
        looked.look()
        moves = 0
        for _ in range(10):
            time.sleep(0.1)
            moves += looked.look()
        assert moves >= 5 and not looked.in_collective
        stop.set()
    waiter.join(10)


def test_a_thread_in_a_gloo_barrier_is_in_a_collective(tmp_path: Path) -> None:
    """A two-process gloo job: rank 0's barrier (torch.distributed's, in a thread) waits for rank 1, which never
    calls it; rank 0 looks at the waiting thread."""
    env = offline_env(tmp_path, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2")
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", RANK],
            env={**env, "RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        printed = ranks[0].communicate(timeout=120)[0]
    finally:
        for rank in ranks:
            rank.kill()
            rank.wait()
    assert "moved False, in a collective True" in printed, printed


RANK = """
import datetime, os, threading, time
import torch.distributed as dist
from llamafactory_hera.training.watch_stack import MainThread
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=10))
if os.environ["RANK"] == "1":
    time.sleep(30)
else:
    waiter = threading.Thread(target=lambda: dist.barrier(), daemon=True)
    waiter.start()
    time.sleep(0.5)
    looked = MainThread(waiter)
    looked.look()
    time.sleep(0.2)
    print(f"moved {looked.look()}, in a collective {looked.in_collective}", flush=True)
    os._exit(0)
"""


def test_a_thread_busy_in_torchs_compiler_is_compiling_and_a_spinning_one_is_not() -> None:
    """A recompile (a new shape in a compiled step) reaches no progress point for minutes while dynamo and inductor
    work in Python: a thread busy in torch's compiler is ``compiling``, which the watchdog counts as work. A thread
    busy elsewhere on one stack (a host waiting on a hung kernel in a spin) is not."""
    stop = threading.Event()
    compiler: dict[str, object] = {"stop": stop}
    exec(compile("def lower(stop):\n    while not stop.is_set():\n        sum(sorted(range(2000)))\n",
                 "/site-packages/torch/_inductor/compile_fx.py", "exec"), compiler)

    def spin() -> None:
        while not stop.is_set():
            sum(range(1000))

    try:
        for target, expected in ((lambda: compiler["lower"](stop), True), (spin, False)):
            looked = MainThread(_thread(target))
            looked.look()
            seen = []
            for _ in range(5):
                time.sleep(0.1)
                looked.look()
                seen.append(looked.compiling)
            assert sum(seen) >= 4 if expected else not any(seen), (expected, seen)
    finally:
        stop.set()


def test_a_polling_main_thread_whose_child_processes_work_moves() -> None:
    """datasets' ``map(num_proc)`` with its bars off: the main thread polls the workers' queue on almost no CPU while
    the workers, child processes, tokenize. Their CPU time is the work seen: the thread moves while a child works,
    and no longer once none does (a deadlocked pool)."""
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            time.sleep(0.05)

    try:
        looked = MainThread(_thread(poll))
        looked.look()
        child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            time.sleep(0.3)
            working = []
            for _ in range(3):
                time.sleep(0.3)
                working.append(looked.look())
        finally:
            child.kill()
            child.wait()
        for _ in range(3):  # the poll's stacks, seen
            time.sleep(0.1)
            looked.look()
        idle = []
        for _ in range(3):
            time.sleep(0.3)
            idle.append(looked.look())
        assert all(working) and not any(idle), (working, idle)
    finally:
        stop.set()
