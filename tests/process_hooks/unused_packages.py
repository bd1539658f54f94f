"""Test-only: this process does not see the eval extra's wandb and scikit-learn, as in the README's install without it.

The test environment installs ``.[test]``, which holds the eval extra (lmms-eval, lm-eval) and with it wandb and
scikit-learn. trl imports wandb and transformers imports scikit-learn whenever they are installed, though neither takes
part in training: 5 to 6 CPU s of every training process's ~20 s of imports on a 2-core machine (measured 2026-11-26:
``import llamafactory.train.tuner`` 19.9-21.9 s, 14.5-16.8 s hidden). Imported by the start-up hooks of the test
processes (:mod:`sitecustomize` beside this file, tests/engine_evidence/, tests/fsdp_cpu/); idempotent.
"""

import importlib.machinery

from hidden_modules import hide

EVAL_ONLY = ("wandb", "sklearn", "scikit-learn")  # top-level modules, and scikit-learn's distribution name

if not getattr(importlib.machinery.PathFinder, "_hera_eval_extra_hidden", False):
    hide(EVAL_ONLY)
    importlib.machinery.PathFinder._hera_eval_extra_hidden = True
