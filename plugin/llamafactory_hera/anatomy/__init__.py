"""What every method shares: head and residual anatomy, metrics, recipe editing, plots, the LlamaBoard panel builder."""
