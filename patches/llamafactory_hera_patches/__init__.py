"""The only code that touches LLaMA-Factory internals.

Every patch is applied by the import hook in ``llamafactory_hera._bootstrap`` right after the
host module it adapts has been executed. Each patch checks the host's shape first
(:mod:`.guard`) and either applies completely or raises one clear error naming the
LLaMA-Factory version; nothing is ever half-patched.

Checked on LLaMA-Factory 0.9.5 (PyPI, identical to tag v0.9.5).
"""

CHECKED_VERSIONS = ("0.9.5",)
