"""The user-error type, raised by the plugin's and the host adapter's checks, printed as one line by
:mod:`llamafactory_hera.job_refusal`. Here, at the door, so the patches import nothing of the plugin."""


class RecipeError(ValueError):
    """A user error found by a check: its message names the key or input, the value and the fix. A ``ValueError``, for
    callers catching that."""
