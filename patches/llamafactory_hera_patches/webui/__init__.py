"""LlamaBoard (LLaMA-Factory's web UI): the methods as stages, with their panels."""
