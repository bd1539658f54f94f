"""Offline demos of the three methods on tiny random-weight models with the stock ``llamafactory-cli`` (``python -m
llamafactory_hera.demo``, run by ``python3 dev.py demo``): the shared parts, and a module per method with only its own.
Cheap to import (no torch).
"""
