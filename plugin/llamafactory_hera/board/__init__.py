"""The LlamaBoard panel every method declares: its spec, builder, widgets, checks and shared texts."""
