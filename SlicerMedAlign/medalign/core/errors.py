"""User-facing errors: each carries one sentence a user can act on (no traceback)."""


class MedAlignError(Exception):
    """Base class: str(error) is a single clear sentence shown to the user as is."""


class InputError(MedAlignError):
    """The input volume or path is unusable (not CT, 2D, corrupt, NaN, missing ...)."""


class CheckpointError(MedAlignError):
    """A weight file is missing, corrupt, fails its SHA-256 or does not match the model."""


class CancelledError(MedAlignError):
    """The user cancelled a run; nothing half-made is left behind."""


class OutputError(MedAlignError):
    """The output folder cannot be used (a file, read-only, outside --out, held by another run)."""
