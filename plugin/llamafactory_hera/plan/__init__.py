"""``llamafactory-hera plan``: a recipe's memory per GPU, fit, FLOPs and time before renting (docs/cost.md)."""
