"""``llamafactory-hera eval``: a trained run against its baseline, through lmms-eval (MLLMs) and lm-eval (text
models)."""
