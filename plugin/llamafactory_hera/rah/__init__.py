"""RAH-LoRA: training-free calibration of high-influence, weakly cross-modal attention heads ("RAH-LoRA:
Training-Free Calibration of High-Influence Attention Heads in MLLMs", 2026, under double-blind review).

``stage: rah``: I-SAL and CAF scores, targets and same-layer anchors, a rank-r step towards the anchors within a
KL trust region per head, written as a standard PEFT LoRA adapter. Declared in :mod:`llamafactory_hera.methods`.
"""
