"""Data and chat templates: the host's templates read, LLaVA-1.5 templates added, image tokens, media warnings."""
