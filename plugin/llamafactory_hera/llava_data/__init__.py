"""LLaVA's training data as it is downloaded (LLaVA-Pretrain-558k, LLaVA-v1.5-mix665k): ``llamafactory-hera data
check`` (a recipe's datasets and images before a long run) and ``llamafactory-hera data convert`` (the one change
LLaMA-Factory's loader needs, string ids). The ``dataset_info.json`` entries are in ``recipes/data``; what to download
and where: ``docs/llava-data.md``."""
