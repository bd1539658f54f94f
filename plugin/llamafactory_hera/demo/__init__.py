"""Offline demos of the three methods on tiny random-weight models (``python3 dev.py demo``); cheap to import."""
