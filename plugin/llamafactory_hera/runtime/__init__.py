"""The plugin's runtime, below the methods: output folder claim and set-aside, run identity and record, save signal,
whole-checkpoint markers, job store, launch watch, method registry, the error type and the one log helper. Imports no
llamafactory."""
