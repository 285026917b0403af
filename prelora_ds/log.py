"""The package's one logger, `prelora_ds`: where a message goes is decided here, not at the call sites.

- info: rank 0 only, on stdout, as written (what the launcher shows a user: the banner, phase changes, validation);
- warnings and errors: every rank, on stderr, as `prelora-train: warning: ...` / `prelora-train: error: ...`
  (a rank's own trouble must not be hidden behind rank 0);
- `extra=EVERY_RANK` shows an info line on every rank that logs it (one line per node, fault drills);
  `extra=RANK_ZERO` keeps a warning that every rank would repeat (a pre-flight check) to rank 0.
While the progress bar is open, lines go through `tqdm.write` so they do not tear it.

Libraries' deprecation notices about their own internals (DeepSpeed 0.19.8 calls collectives that torch 2.14
renamed) are filtered here by message, not by category: the user can do nothing about them, and every other
warning still shows.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

logger = logging.getLogger("prelora_ds")
EVERY_RANK = {"every_rank": True}
RANK_ZERO = {"rank_zero": True}
_PREFIX = {logging.WARNING: "prelora-train: warning: ", logging.ERROR: "prelora-train: error: ",
           logging.CRITICAL: "prelora-train: error: "}  # fmt: skip
_bar = None  # the open tqdm bar, if any (the recorder's Display sets it)
# torch 2.14 deprecates the collectives DeepSpeed 0.19.8 calls on every ZeRO step (one FutureWarning per rank)
LIBRARY_NOISE = (
    r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor|gather_into_tensor)` is deprecated",
    r"`torch\.distributed\._(all_gather_base|reduce_scatter_base)` is a private function and will be deprecated",
)


def env_rank() -> int:
    """This process's rank before the process group exists (launcher, torchrun or MPI variables; else 0)."""
    for key in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


class _Filter(logging.Filter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        if self.rank == 0:
            return True
        if record.levelno >= logging.WARNING:
            return not getattr(record, "rank_zero", False)
        return getattr(record, "every_rank", False)


class _Handler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = _PREFIX.get(record.levelno, "") + record.getMessage()
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            if _bar is not None:
                _bar.write(text, file=stream)
            else:
                print(text, file=stream, flush=True)
        except Exception:  # logging must never end the run
            self.handleError(record)


def quiet_library_noise() -> None:
    """Ignore the libraries' deprecation notices in LIBRARY_NOISE (by message: other warnings still show)."""
    for message in LIBRARY_NOISE:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)


def setup_logging(rank: int | None = None) -> None:
    """(Re)configure the package logger for this rank; called at start-up and again once the rank is known."""
    quiet_library_noise()
    logger.handlers.clear()
    handler = _Handler()
    handler.addFilter(_Filter(env_rank() if rank is None else rank))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def set_progress_bar(bar) -> None:
    """Route log lines through `bar.write` while it is open (None: plain prints again)."""
    global _bar
    _bar = bar


setup_logging()  # rank from the environment until the process group says (train.main calls it again)
