"""The options of ``llamafactory-hera select`` and their choices (imports nothing: the command line is built from these
at every start of ``llamafactory-hera``, including ``eval`` and its one-line errors, which must not load torch)."""

STRATEGIES = ("worst", "best", "random")
MODES = ("text", "multimodal")
DTYPES = ("float32", "bfloat16", "float16")

# command-line options that fall back to a recipe key (the same keys hera_heads: auto reads):
# (flag, type, recipe key, what it sets)
RECIPE_BACKED: tuple[tuple[str, type, str, str], ...] = (
    ("--samples", int, "hera_select_samples", "image-caption pairs to score on"),
    ("--heads", int, "hera_select_num_heads", "number of heads to choose"),
    ("--strategy", str, "hera_select_strategy", "worst: least aligned (paper); best / random: ablations"),
    ("--mode", str, "hera_select_mode", "text: captions alone through the language model (paper); multimodal: "
     "image + caption through the MLLM"),
    ("--clamp", float, "hera_select_clamp", "PRH's outlier clamp: feature values clamped at this quantile of |value| "
     "before normalising, both sides; 0 turns it off"),
    ("--batch-size", int, "hera_select_batch_size", "forward batch size"),
    ("--k", int, "hera_k", "neighbours for MKNN"),
    ("--teacher", str, "hera_teacher", "vision teacher"),
)
CHOICES = {"hera_select_strategy": STRATEGIES, "hera_select_mode": MODES}


def dest(flag: str) -> str:
    """The namespace attribute of a ``select`` option (``--batch-size`` -> ``batch_size``)."""
    return flag.lstrip("-").replace("-", "_")
