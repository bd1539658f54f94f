"""LLaMA-Factory's SFT trainer class, which a method's trainer class extends; read where it is defined (the stage
patch swaps the SFT workflow's name while a run trains).
"""

from llamafactory.train.sft.trainer import CustomSeq2SeqTrainer as HostTrainer

__all__ = ["HostTrainer"]
