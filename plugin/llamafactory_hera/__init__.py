"""llamafactory-hera: HeRA, RAH-LoRA and HARC, head- and residual-level methods, as stages of LLaMA-Factory.

This module is imported by the ``llamafactory_hera.pth`` start-up hook of every Python
process, so it must stay free of heavy imports (no torch, no transformers).
"""

__version__ = "0.1.0"
