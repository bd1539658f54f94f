"""``llamafactory-hera compose``: a LLaVA-1.5-style model (transformers' ``LlavaForConditionalGeneration``) from a
text-only LLM and an image encoder, with its processor and the LLaMA-Factory template to train it with.

:mod:`.plan` reads the parts' configs and refuses what it cannot compose, :mod:`.build` writes the checkpoint,
:mod:`.cli` is the verb.
"""
