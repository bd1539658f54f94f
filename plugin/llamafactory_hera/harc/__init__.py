"""HARC: harmfulness-refusal coupling (``stage: harc``), LoRA safety fine-tuning of text LLMs (arXiv 2607.00572)."""
