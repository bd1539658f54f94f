"""The offline demos of the three methods on tiny random-weight models, with the stock ``llamafactory-cli``.

    python -m llamafactory_hera.demo [--method hera|rah|harc] [--output DIR] ...   (what ``python3 dev.py demo`` runs)

This package holds what the demos share: the dispatcher (:mod:`.cli`, run by ``__main__``), the output folders
(:mod:`.folders`: one folder per method under ``DIR``, each replaced only by its own demo's next run), running
``llamafactory-cli train`` with its output filtered (:mod:`.runner`, :mod:`.console`), the summary printed after the
run (:mod:`.summary`). Each method's demo lives in its own package and declares only what is its own (assets,
recipe, outputs, figures, next steps): :mod:`llamafactory_hera.hera.demo`, :mod:`llamafactory_hera.rah.demo`,
:mod:`llamafactory_hera.harc.demo`. Importing this package is cheap (no torch).
"""

from llamafactory_hera.demo.cli import main

__all__ = ["main"]
