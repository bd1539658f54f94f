"""The paper's LLaVA-1.5 experiment (HeRA's Table 2): ``llamafactory-hera compose`` (:mod:`.compose_plan`,
:mod:`.compose_build`) and LLaVA's training data as it is downloaded (``data check``, ``data convert``); the verbs are
:mod:`.cli`, what to download and where ``docs/llava-data.md``.
"""
