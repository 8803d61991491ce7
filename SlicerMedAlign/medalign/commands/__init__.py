"""CLI sub-commands: each module offers ``register(subparsers)`` and sets ``func`` to a
``run(args) -> int`` so ``medalign.cli`` stays a thin dispatcher."""

# Order is the order shown in ``medalign --help``.
COMMAND_MODULES = [
    "screen",
    "batch",
    "eval",
    "train",
    "phantoms",
    "label_reports",
    "models",
]
