"""The offline demos of the three methods on tiny random-weight models, with the stock ``llamafactory-cli``
(``python -m llamafactory_hera.demo``, what ``python3 dev.py demo`` runs): what the demos share, and a module per method
(``hera.py``, ``rah.py``, ``harc.py``) that declares only what is its own. Importing this is cheap (no torch).
"""
