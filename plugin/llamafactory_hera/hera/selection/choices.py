"""The choices of ``llamafactory-hera select``'s options (imports nothing: the command line is built from these at
every start of ``llamafactory-hera``, including ``eval`` and its one-line errors, which must not load torch)."""

STRATEGIES = ("worst", "best", "random")
MODES = ("text", "multimodal")
DTYPES = ("float32", "bfloat16", "float16")
