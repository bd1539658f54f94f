"""A training run's lifecycle: the recipe checked in the launcher, the output folder claimed, the run recorded."""
