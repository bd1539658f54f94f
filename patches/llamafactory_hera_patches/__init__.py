"""The only code that touches LLaMA-Factory internals.

Every patch is applied by the import hook in ``llamafactory_hera._bootstrap`` right after the
host module it adapts has been executed. Each patch checks the host's shape first
(:mod:`.guard`) and either applies completely or raises one clear error naming the
LLaMA-Factory version; nothing is ever half-patched.

Rooms: the entry patches at the top (:mod:`.stage`: the methods' stages in the trainer's entry point; :mod:`.launch`
and :mod:`.accelerate_launch`: the recipe checked before torchrun or accelerate starts the ranks; :mod:`.v1`:
LLaMA-Factory's v1 trainers, which run no plugin stage; :mod:`.backends`: the backend switches a plugin stage is
refused under) over
:mod:`.lifecycle` (a run's output folder, identity and record), :mod:`.engines` (FSDP2, DeepSpeed, 4-bit weights,
checkpointing), :mod:`.recipe` (keys as the host reads them), :mod:`.data` (templates, image tokens), :mod:`.tools`
(what the offline tools load) and :mod:`.webui` (LlamaBoard); :mod:`.errors`, :mod:`.guard`, :mod:`.registry`,
:mod:`.logging` and :mod:`.stacks` serve them all.
"""

CHECKED_VERSIONS = ("0.9.5", "0.9.6.dev0")
