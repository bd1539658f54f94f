"""A training run's lifecycle: its output folder claimed and set aside, who it is, what it loaded, how it ended."""
