"""RAH-LoRA (seed 004): training-free calibration of high-influence, weakly cross-modal attention heads.

Work in progress: the numerical steps (I-SAL, CAF, targets and anchors, similarity, representative
anchor, low-rank update, trust region) and the PEFT adapter they become; ``stage: rah`` is not declared yet.
"""
