"""``llamafactory-hera plan``: a recipe's memory per GPU, fit, FLOPs and time before renting, from the model's config
on a CPU (docs/cost.md)."""
