"""Test-only start-up hook of every process a test starts (tests/conftest.py ``offline_env``): the packages its run
does not use hidden (:mod:`unused_packages`). The other hooks (tests/engine_evidence/, tests/fsdp_cpu/,
tests/without_deepspeed/) come first on ``PYTHONPATH`` when a test adds them, and import it themselves: Python runs the
first ``sitecustomize`` it finds."""

import unused_packages  # noqa: F401
