"""Test-only: this process does not see the eval extra's wandb and scikit-learn, as in the README's install without it.

The test environment installs ``.[test]``, which holds the eval extra (lmms-eval, lm-eval) and with it wandb and
scikit-learn. trl imports wandb and transformers imports scikit-learn whenever they are installed, though neither takes
part in training: 5 to 6 CPU s of every training process's ~20 s of imports on a 2-core machine (measured 2026-11-26:
``import llamafactory.train.tuner`` 19.9-21.9 s, 14.5-16.8 s hidden). Imported by the start-up hooks of the test
processes (:mod:`sitecustomize` beside this file, tests/engine_evidence/, tests/fsdp_cpu/); idempotent.
"""

import importlib.machinery

EVAL_ONLY = ("wandb", "sklearn", "scikit-learn")  # top-level modules, and scikit-learn's distribution name

if not getattr(importlib.machinery.PathFinder, "_hera_eval_extra_hidden", False):
    _find_spec = importlib.machinery.PathFinder.find_spec
    _find_distributions = importlib.machinery.PathFinder.find_distributions

    def _spec(cls, fullname, path=None, target=None):
        return None if fullname.partition(".")[0] in EVAL_ONLY else _find_spec(fullname, path, target)

    def _distributions(*args, **kwargs):
        return (dist for dist in _find_distributions(*args, **kwargs)
                if (dist.metadata["Name"] or "").lower() not in EVAL_ONLY)

    # a classmethod, as PathFinder's own: pytest keeps ``PathFinder.find_spec`` as a class attribute of its import
    # hook and calls it through its instance, which a plain function would take as ``fullname``
    importlib.machinery.PathFinder.find_spec = classmethod(_spec)
    importlib.machinery.PathFinder.find_distributions = staticmethod(_distributions)
    importlib.machinery.PathFinder._hera_eval_extra_hidden = True
