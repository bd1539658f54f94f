"""Test-only start-up hook: this interpreter has no DeepSpeed, as where it is not installed (the README's environment).

Put this folder first on ``PYTHONPATH``: the path finder then finds neither the ``deepspeed`` package nor its
distribution's metadata (``importlib.util.find_spec`` is None, ``importlib.metadata.version`` raises
``PackageNotFoundError``), while the test environment keeps its DeepSpeed for the ZeRO tests.
tests/test_torchrun_refusals.py uses it.
"""

import os
import sys

sys.path.append(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "process_hooks"))
import unused_packages  # noqa: E402, F401 - tests/process_hooks/: as in every process a test starts
from hidden_modules import hide  # noqa: E402 - tests/process_hooks/

hide(("deepspeed",))
