"""The plugin's runtime, beside the patches and below the methods: the output folder's claim and set-aside, the run's
identity and record, its save signal and whole-checkpoint markers, the job's store and launch watch, the method
registry, and the one error type. Imports no llamafactory."""
