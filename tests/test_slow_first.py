"""xdist's workers each collect the tests and must agree on the order (else: "Different tests were collected")."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ORDER = """
import sys, types
sys.path.insert(0, {folder!r})
from slow_first import SLOW_MODULES, slow_first
items = [types.SimpleNamespace(nodeid=f"{{module}}::test_{{k}}") for module in list(SLOW_MODULES) + ["tests/a.py"]
         for k in range(3)]
print([item.nodeid for item in slow_first(items, 2)])
"""


def test_the_order_is_the_same_under_every_hash_seed() -> None:
    """Modules of equal seconds come in one order whatever PYTHONHASHSEED a worker drew."""
    script = ORDER.format(folder=str(Path(__file__).parent))
    orders = {subprocess.run([sys.executable, "-c", script], env={"PYTHONHASHSEED": str(seed)}, check=True,
                             capture_output=True, text=True).stdout for seed in range(6)}
    assert len(orders) == 1, orders
