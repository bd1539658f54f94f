"""``llamafactory-hera eval``: a run against its baseline, via lmms-eval (MLLMs) or lm-eval (text models)."""
