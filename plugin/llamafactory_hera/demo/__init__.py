"""The offline demos of the three methods on tiny random-weight models, with the stock ``llamafactory-cli``
(``python -m llamafactory_hera.demo``, what ``python3 dev.py demo`` runs): what the demos share. Each method's demo
lives in its own package (``hera/demo.py``, ...) and declares only what is its own. Importing this is cheap (no torch).
"""

from llamafactory_hera.demo.cli import main

__all__ = ["main"]
