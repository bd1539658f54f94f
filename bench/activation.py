"""Start-up cost of the plugin's `.pth` hook for a Python process that never imports LLaMA-Factory.

Runs `python -S` and then processes this environment's site-packages `.pth` files by hand, once
with and once without `llamafactory_hera.pth` (same site machinery on both sides), interleaved
A/B, and prints medians and their difference. Also prints `-X importtime` for our modules.

Usage: python bench/activation.py [--repeats 40]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import sysconfig
import time

SITE = sysconfig.get_paths()["purelib"]
# Both sides: site-packages on sys.path, then every .pth file processed by site.addpackage; the only
# difference is whether llamafactory_hera.pth is among them.
RUNNER = ("import os, site; d = {site!r}; sys.path.append(d); known = set(); "
          "[site.addpackage(d, n, known) for n in sorted(os.listdir(d)) "
          "if n.endswith('.pth') and ({include} or n != 'llamafactory_hera.pth')]")


def _command(include: bool) -> list[str]:
    code = "import sys; " + RUNNER.format(site=SITE, include=include)
    return [sys.executable, "-S", "-c", code]


def _time(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args()
    with_hook, without = _command(True), _command(False)
    for _ in range(3):  # warm-up (page cache)
        _time(with_hook), _time(without)
    a, b = [], []
    for _ in range(args.repeats):
        a.append(_time(with_hook))
        b.append(_time(without))
    med_a, med_b = statistics.median(a), statistics.median(b)
    print(f"python start-up, {args.repeats} interleaved runs each (site-packages: {SITE})")
    print(f"  with llamafactory_hera.pth    median {med_a * 1e3:7.2f} ms")
    print(f"  without llamafactory_hera.pth median {med_b * 1e3:7.2f} ms")
    print(f"  difference {1e3 * (med_a - med_b):+.2f} ms  (ratio {med_a / med_b:.3f})")
    trace = subprocess.run([sys.executable, "-X", "importtime", "-c", "pass"], capture_output=True, text=True).stderr
    ours = [line for line in trace.splitlines() if "llamafactory_hera" in line]
    print("-X importtime (self us | cumulative us | module):")
    for line in ours:
        print("  " + line.split(":", 1)[1].strip())
    heavy = [m for m in ("torch", "transformers", "llamafactory", "typing") if any(
        line.rsplit("|", 1)[-1].strip() == m for line in trace.splitlines())]
    print(f"heavy modules imported at start-up: {heavy or 'none'}")


if __name__ == "__main__":
    main()
