"""The paper's LLaVA-1.5 experiment (HeRA's Table 2): ``compose`` (:mod:`.compose_plan`, :mod:`.compose_build`) and
LLaVA's downloaded data (``data check``, ``data convert``); verbs: :mod:`.cli`; downloads: ``docs/llava-data.md``.
"""
