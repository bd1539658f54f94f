"""The plugin's runtime, beside the patches and below the methods: a run's output folder claimed and set aside, who it
is, what it loaded and how it ended (its record), its save signal and whole-checkpoint markers, the job's store and the
launcher's watch of the ranks' start, the registry of the methods, and the one error type. Imports no llamafactory."""
