"""A recipe's keys as LLaMA-Factory reads them: the method's keys split off, the host's keys, the file."""
