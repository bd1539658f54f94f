"""LLaMA-Factory's SFT trainer class, which a method's trainer class extends where it is defined (the plugin reaches
the host through the patches). Read from the module that defines it: the stage patch swaps the SFT workflow's name
for the method's class while a run trains.
"""

from llamafactory.train.sft.trainer import CustomSeq2SeqTrainer as HostTrainer

__all__ = ["HostTrainer"]
