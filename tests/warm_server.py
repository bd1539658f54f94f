"""The warm process of tests/warm_launch.py: imports a launch's modules once, then forks each launch from itself.

Usage (by tests/warm_launch.py only): ``python warm_server.py MODULE...`` with the environment every launch it serves
has (what a fresh interpreter decides at start-up from the environment, the start-up hooks on ``PYTHONPATH`` and the
plugin's ``.pth`` hook, is decided here once with the same values). It imports the MODULEs in order (the script's
own imports, so the plugin's patches apply as its import hook applies them in a new process), checks that it is
still one thread (no thread, no intra-op pool, no process group started: fork copies the calling thread only),
prints ``[warm] ready``, then reads one request per line on stdin (JSON: ``script``, ``args``, ``cwd``, ``env`` per
rank, ``stdout`` / ``stderr`` files, ``store_port``) and answers ``[warm] pid P`` when the launch's agent is forked and
``[warm] done CODE CPU_S`` when it ended.

A launch: one agent process (a session of its own, so it and its ranks are killed as a group) forks every rank first,
while still one thread, then (torchrun's part) hosts the TCP store the ranks connect to, as torchrun's agent does
(``TORCHELASTIC_USE_AGENT_STORE``), and waits for them; a rank that fails ends the others, as torchrun stops them.
A rank sets its environment, folder and ``sys.argv``, points file descriptors 1 and 2 at the launch's files, runs
the script as ``__main__`` and exits as an interpreter does: ``SystemExit``'s code, 1 and a traceback on an uncaught
error, ``atexit`` handlers run, streams flushed.
"""

import atexit
import importlib
import json
import os
import resource
import runpy
import signal
import sys
import threading
import traceback

# threads of libraries that fork safely beside them: pyarrow's bundled jemalloc (datasets imports pyarrow) starts its
# background purging thread at import, and jemalloc takes its locks before a fork and resets them in the child
# (pthread_atfork), as it must for any forking program
FORK_SAFE_THREADS = ("jemalloc_bg_thd",)


def threads() -> list[str]:
    """The names of this process's OS threads other than the calling one and :data:`FORK_SAFE_THREADS` (Python's
    and any native pool's: an intra-op pool, gloo's, a TCP store's)."""
    names = []
    for task in os.listdir("/proc/self/task"):
        if int(task) != threading.get_native_id():
            with open(f"/proc/self/task/{task}/comm", encoding="utf-8") as comm:
                names.append(comm.read().strip())
    return [name for name in names if name not in FORK_SAFE_THREADS]


def one_thread() -> None:
    if threads() or threading.active_count() != 1:
        raise SystemExit(f"[warm] not safe to fork: other OS threads {threads()}, "
                         f"{threading.active_count()} Python threads")


def run_rank(request: dict, rank: int, out: int, err: int) -> None:
    """One rank: never returns."""
    code = 1
    try:
        os.dup2(out, 1)
        os.dup2(err, 2)
        os.environ.clear()
        os.environ.update(request["env"][rank])
        os.chdir(request["cwd"])
        sys.argv = [request["script"], *request["args"]]
        sys.path[0] = os.path.dirname(os.path.abspath(request["script"]))
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        try:
            runpy.run_path(request["script"], run_name="__main__")
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
            if not isinstance(stop.code, int | None):
                print(stop.code, file=sys.stderr)
        except BaseException:  # noqa: BLE001 - reported as the interpreter reports an uncaught error
            sys.excepthook(*sys.exc_info())
            code = 1
        atexit._run_exitfuncs()
    except BaseException:  # noqa: BLE001 - the rank's own set-up failed: said on its stderr
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001, S110 - a closed stream: nothing more to say
                pass
        os._exit(code)


def run_agent(request: dict) -> None:
    """One launch: never returns (exit 0 when every rank exited 0, else 1)."""
    code = 1
    try:
        os.setsid()
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
        out, err = os.open(request["stdout"], flags), os.open(request["stderr"], flags)
        ranks = []
        for rank in range(len(request["env"])):
            pid = os.fork()
            if pid == 0:
                run_rank(request, rank, out, err)
            ranks.append(pid)
        store = None
        if request.get("store_port"):  # torchrun's agent store, hosted after the forks (it starts threads)
            from datetime import timedelta

            import torch.distributed

            store = torch.distributed.TCPStore("127.0.0.1", request["store_port"], len(ranks), True,
                                               timedelta(minutes=15), wait_for_workers=False)
        codes, failed = {}, False
        while len(codes) < len(ranks):
            pid, status = os.wait()
            codes[pid] = os.waitstatus_to_exitcode(status)
            if codes[pid] != 0 and not failed:
                failed = True
                for other in ranks:
                    if other not in codes:
                        os.kill(other, signal.SIGTERM)
        if failed:
            os.write(err, ("[warm] ranks' exit codes: " + ", ".join(
                f"rank {ranks.index(pid)} exitcode : {codes[pid]}" for pid in ranks) + "\n").encode())
        code = int(failed)
        del store
    except BaseException:  # noqa: BLE001 - said on the launch's stderr
        traceback.print_exc()
    finally:
        os._exit(code)


def main() -> None:
    for name in sys.argv[1:]:
        importlib.import_module(name)
    one_thread()
    print("[warm] ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        one_thread()
        sys.stdout.flush()
        sys.stderr.flush()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        pid = os.fork()
        if pid == 0:
            run_agent(request)
        print(f"[warm] pid {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        print(f"[warm] done {os.waitstatus_to_exitcode(status)} {cpu:.2f}", flush=True)


if __name__ == "__main__":
    main()
