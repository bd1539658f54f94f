"""Offline demos of the three methods on tiny random-weight models with the stock ``llamafactory-cli`` (``python3 dev.py
demo``): shared parts, and one module per method. Cheap to import (no torch).
"""
