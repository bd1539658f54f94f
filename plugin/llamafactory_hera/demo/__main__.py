"""``python -m llamafactory_hera.demo`` (:mod:`llamafactory_hera.demo.cli`)."""

import sys

from llamafactory_hera.demo.cli import main

sys.exit(main())
