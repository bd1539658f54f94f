"""llamafactory-hera: HeRA, RAH-LoRA and HARC, head- and residual-level methods, as stages of LLaMA-Factory.

The ``llamafactory_hera.pth`` start-up hook imports this in every Python process: no heavy imports (torch,
transformers).
"""

__version__ = "0.1.0"
