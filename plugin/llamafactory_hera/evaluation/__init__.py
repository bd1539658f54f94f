"""``llamafactory-hera eval``: a trained run against its baseline, through lmms-eval (MLLMs) and lm-eval (text models).

- :mod:`.cli`: the verb, its arguments and the cheap checks;
- :mod:`.runs`: a run directory read back into the recipe keys LLaMA-Factory loads it with;
- :mod:`.presets`: the paper's benchmark groups as task names, and ``demo``;
- :mod:`.demo_tasks`: the offline demo task folders (local lmms-eval / lm-eval task definitions);
- :mod:`.runner`: the model loaded by LLaMA-Factory, served to lmms-eval / lm-eval; one task on it, and the loop
  with its per-model, per-task cache;
- :mod:`.report`: ``eval_report_vs_<baseline>.json`` / ``.md`` / ``.png``, one per comparison.
"""
