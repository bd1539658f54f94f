"""Test-only start-up hook of every training process a test starts (tests/conftest.py ``offline_env``): the eval
extra's wandb and scikit-learn hidden (:mod:`eval_extra_hidden`). The other hooks (tests/engine_evidence/,
tests/fsdp_cpu/) come first on ``PYTHONPATH`` when a test adds them, and import it themselves: Python runs the first
``sitecustomize`` it finds."""

import eval_extra_hidden  # noqa: F401
