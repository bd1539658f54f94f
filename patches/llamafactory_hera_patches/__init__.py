"""The only code that touches LLaMA-Factory internals: its patches, and its data read for the plugin's checks and tools.

Every patch is applied by the import hook in ``llamafactory_hera._bootstrap`` right after the host module it adapts
has been executed. Each patch checks the host's shape first (:mod:`.guard`) and either applies completely or raises one
clear error naming the LLaMA-Factory version; nothing is ever half-patched.

Rooms: the apply modules at the top (:mod:`.stage`: the methods' stages in the trainer's entry point; :mod:`.launch`
and :mod:`.accelerate_launch`: the recipe checked before torchrun or accelerate starts the ranks; :mod:`.v1`:
LLaMA-Factory's v1 trainers, which run no plugin stage; :mod:`.webui`: LlamaBoard; :mod:`.logging`: the metrics
logged) over :mod:`.recipe` (keys as the host reads them, the checks before its parse), :mod:`.engines` (FSDP2,
DeepSpeed, 4-bit weights, checkpointing), :mod:`.data` (templates, image tokens), :mod:`.tools` (what the offline tools
load) and :mod:`.backends` (the backend switches a plugin stage is refused under); :mod:`.guard` and :mod:`.stacks`
check the host and its stack. The plugin's runtime, which they use, is ``llamafactory_hera.runtime``.

The apply modules import LLaMA-Factory at their top: the hook imports each once the host module it patches ran. The
others import it inside the functions that read it (lazy): the plugin's light modules import them (the checks before
LLaMA-Factory loads, ``llamafactory-hera``'s verbs), and importing LLaMA-Factory takes seconds and runs its version
checks.
"""

CHECKED_VERSIONS = ("0.9.5", "0.9.6.dev0")
