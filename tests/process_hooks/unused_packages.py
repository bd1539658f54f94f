"""Test-only: this process does not see the installed packages its run does not use, as in an install without them.

tests/conftest.py ``offline_env`` names them in ``HERA_TESTS_HIDDEN`` (comma-separated top-level modules and
distribution names; the ranks a launcher starts inherit it):
- the eval extra's wandb, scikit-learn and nltk (the README's install without the extra): trl imports wandb,
  transformers scikit-learn and LLaMA-Factory's SFT metric nltk whenever they are installed, though none takes part in
  training (measured 2026-11-26: ``import llamafactory.train.tuner`` 19.9-21.9 s, 14.5-16.8 s without the first two);
- the test extra's engines a run does not use: DeepSpeed (accelerate's ``extract_model_from_parallel`` imports it in
  every Trainer when installed) unless the recipe names a ``deepspeed`` config, bitsandbytes (PEFT's LoRA dispatch
  imports it, and it compiles its ops at import) unless the run quantizes. About 4 CPU s of each training process's
  ~23 on a 2-core machine (tests/test_unused_packages.py); the in-process tests keep every package in sight.
Imported by the start-up hooks of the test processes (:mod:`sitecustomize` beside this file, tests/engine_evidence/,
tests/fsdp_cpu/, tests/without_deepspeed/); idempotent.
"""

import importlib.machinery
import os

from hidden_modules import hide

if not getattr(importlib.machinery.PathFinder, "_hera_unused_packages_hidden", False):
    hide(tuple(name for name in os.environ.get("HERA_TESTS_HIDDEN", "").split(",") if name))
    importlib.machinery.PathFinder._hera_unused_packages_hidden = True
