"""The user-error type, raised by the plugin's checks and the host adapter's, printed as one line by
:mod:`llamafactory_hera.job_refusal`. Defined here, at the door, so both sides raise it and the patches import nothing
of the plugin."""


class RecipeError(ValueError):
    """A user error found by a check: its message names the key or input, the value and the fix. A ``ValueError``, so
    callers catching that still do."""
