"""RAH-LoRA: training-free calibration of high-influence, weakly cross-modal attention heads (``stage: rah``), written
as a standard PEFT LoRA adapter (docs/rah.md). Declared in :mod:`llamafactory_hera.methods`.
"""
