"""The ``medalign`` command line: one module per sub-command, dispatched by ``dispatch``."""

from medalign.cli.dispatch import main

__all__ = ["main"]
