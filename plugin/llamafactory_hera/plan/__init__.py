"""``llamafactory-hera plan``: a recipe's memory per GPU, fit, FLOPs and time before renting, counted on a CPU from the
model's config alone (docs/cost.md)."""
