"""The paper's LLaVA-1.5 experiment (HeRA's Table 2): ``llamafactory-hera compose`` (a LLaVA-1.5-style model from a
text-only LLM and an image encoder, with its processor and the LLaMA-Factory template to train it with:
:mod:`.compose_plan` reads the parts' configs and refuses what it cannot compose, :mod:`.compose_build` writes the
checkpoint) and LLaVA's training data as it is downloaded (``llamafactory-hera data check``, :mod:`.data_check`: a
recipe's datasets and images before a long run; ``data convert``, :mod:`.data_convert`: the string ids LLaMA-Factory's
loader needs). The ``dataset_info.json`` entries are in ``recipes/data``; what to download and where:
``docs/llava-data.md``. The verbs: :mod:`.cli`.
"""
