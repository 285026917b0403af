"""The package's errors: each carries a message for the user that says what is wrong and what to do.

`train.main` maps them to exit codes: ConfigError -> 2 (nothing started), RendezvousError and TrainingError -> 1.
"""


class ConfigError(ValueError):
    """A recipe or command-line value that cannot run; the message says how to fix it."""


class RendezvousError(RuntimeError):
    """The process group could not start; the message names the address and the variables to check."""


class TrainingError(RuntimeError):
    """A run that cannot go on; the message says why and what to do. The last complete checkpoint is kept."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, unwritable): it stays incomplete and is never resumed."""


class NonFiniteError(ValueError):
    """A NaN or infinite norm or loss reached the convergence test: the run diverged."""
