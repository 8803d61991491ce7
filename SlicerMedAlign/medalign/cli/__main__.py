"""``python -m medalign.cli``: the ``medalign`` command (torchrun starts it this way)."""

import sys

from medalign.cli.dispatch import main

sys.exit(main())
