"""The LlamaBoard panel every method declares."""
