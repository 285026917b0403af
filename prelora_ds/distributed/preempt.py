"""Pre-emption: a scheduler's stop signal becomes one stop that every rank makes after the same optimizer step.

SIGTERM (SLURM, Kubernetes, the `deepspeed` launcher), SIGINT (Ctrl-C, the launcher's pdsh runner) and SIGUSR1
(SLURM's `--signal=USR1@<seconds>` before the time limit) only set a flag here. After every optimizer step the
ranks all-reduce (MAX) the flag together with the earliest signal time, so a signal that reaches one rank, one
node, or every rank at different moments stops all of them after the same step; that step is checkpointed and
the process exits with EXIT_CODE. Further signals while stopping are logged and ignored: the save finishes
(a SIGKILL mid-save still leaves the previous complete checkpoint, see checkpoint.py). A launcher of this rank that
went (the `deepspeed` runner killed alone: distributed/supervisor.py) sets the same flag, checked just before the
agreement, so orphaned ranks stop the same way. docs/reliability.md.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass

from prelora_ds.distributed import collectives
from prelora_ds.distributed.supervisor import LauncherWatch
from prelora_ds.log import logger

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# sysexits.h EX_TEMPFAIL, "a temporary failure, the user is invited to retry": a scheduler script or a
# Kubernetes podFailurePolicy reads it as "requeue me" (docs/reliability.md)
EXIT_CODE = 75
MARKER = "preempted.json"  # in the run directory from the stop until a --resume starts training
LAUNCHER_GRACE_S = 30.0  # the deepspeed launcher SIGKILLs its ranks this long after it terminates them
# the reason code of a stop because a launcher went (the all-reduce carries signal numbers; 1 is below every
# number in SIGNALS, so when a real signal came too, the MAX names that signal)
LAUNCHER_GONE = 1


def reason(code: int) -> str:
    """The name of a stop's reason code: SIGTERM, SIGINT, SIGUSR1 or LAUNCHER_GONE."""
    return "LAUNCHER_GONE" if code == LAUNCHER_GONE else signal.Signals(code).name


@dataclass(frozen=True)
class StopDecision:
    """The common decision after a step: whether to stop, which signal came first (or LAUNCHER_GONE), and when
    (wall clock)."""

    stop: bool
    signal_name: str = ""
    first_signal_time: float = math.nan


class StopRequest:
    """Signal handlers that only record; `agreed()` is the per-step collective that turns them into a decision.

    `watch`: this rank's launchers (supervisor.LauncherWatch), checked in `agreed()` before the collective; one
    that went requests the stop as a signal would."""

    def __init__(self, watch: LauncherWatch | None = None) -> None:
        self.signum: int | None = None  # a signal's number, or LAUNCHER_GONE
        self.time: float = math.nan
        self.extra: int = 0  # signals after the first
        self.watch = watch or LauncherWatch()
        self._previous: dict[int, object] = {}

    def install(self) -> StopRequest:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum, self.time = signum, time.time()
            logger.warning(f"got {signal.Signals(signum).name}: stopping after this step")
        else:
            self.extra += 1
            again = "again" if self.signum != LAUNCHER_GONE else "after its launcher went"
            logger.warning(f"got {signal.Signals(signum).name} {again}: still stopping, the checkpoint is being saved")

    def check_launchers(self) -> None:
        """A launcher of this rank that is gone requests the stop, as a signal would (once)."""
        if self.requested:
            return
        gone = self.watch.gone()
        if gone is not None:
            self.signum, self.time = LAUNCHER_GONE, time.time()
            logger.warning(f"{gone} is gone: stopping after this step as for a pre-emption")

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def agreed(self) -> StopDecision:
        """The launcher check, then one all-reduce (MAX) of [flag, -signal time, signal number] over the statistics
        group: every rank calls it after every optimizer step."""
        self.check_launchers()
        flag = float(self.requested)
        neg_time = -self.time if self.requested else -math.inf
        got, first, signum = collectives.all_reduce_max([flag, neg_time, float(self.signum or 0)])
        if not got:
            return StopDecision(False)
        return StopDecision(True, reason(int(signum)), -first)


def ignore_in_worker(_worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: a scheduler that signals every process (SLURM, the launcher's process-tree
    terminate) must not kill the input workers while the main process finishes its step and checkpoint."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
