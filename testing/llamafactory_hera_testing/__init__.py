"""Test support of llamafactory-hera, shared by ``tests/`` and ``bench/``; not part of the package users install.

``accelerator``: the simulated accelerator (device placement checks, host syncs counted per step); ``recipes``:
small HeRA and HARC recipes for the tiny fixture models; ``teachers``: tiny vision teachers of every family HeRA
reads; ``families``: tiny LLaVA-NeXT and InternVL models (the shipped recipes' further families); ``parts``: tiny
text-only LLMs and image encoders for ``compose``; ``llava_data``: tiny files in LLaVA's 558k and 665k formats.
Installed by ``python3 dev.py test`` (or ``pip install ./testing``).
"""
