"""Distributed engines and memory savers: FSDP2, DeepSpeed ZeRO-3, 4-bit weights, checkpointing, KV sharing."""
