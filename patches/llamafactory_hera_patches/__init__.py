"""The only code touching LLaMA-Factory internals: its patches, and host data read for the plugin's checks and tools.

The import hook in ``llamafactory_hera._bootstrap`` applies each patch right after the host module it adapts executed.
Each checks the host's shape first (:mod:`.guard`), then applies completely or raises one error naming the
LLaMA-Factory version; nothing is half-patched.

Apply modules (:mod:`.stage`, :mod:`.launch`, :mod:`.accelerate_launch`, :mod:`.v1`, :mod:`.webui`, :mod:`.logging`)
sit over :mod:`.recipe`, :mod:`.engines`, :mod:`.data`, :mod:`.tools` and :mod:`.backends`; :mod:`.guard` and
:mod:`.stacks` check the host and its stack.

Apply modules import LLaMA-Factory at their top; the others inside the functions that read it ("lazy"): the plugin's
light modules import them, and importing LLaMA-Factory takes seconds and runs its version checks.
"""

CHECKED_VERSIONS = ("0.9.5", "0.9.6.dev0")
