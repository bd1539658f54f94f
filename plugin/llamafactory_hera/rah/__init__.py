"""RAH-LoRA (``stage: rah``): training-free calibration of high-influence, weakly cross-modal attention heads, written
as a PEFT LoRA adapter (docs/rah.md)."""
