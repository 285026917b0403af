"""No orphaned ranks: when a process that launched this node's ranks goes, they stop as for a pre-emption.

A SIGTERM to the `deepspeed` command alone (`kill <pid>` of a job's main process, `timeout --foreground`, a
supervisor that signals one process) ends the runner at once without passing anything on; the per-node
launcher (deepspeed.launcher.launch) and the ranks would train on to the end with nobody to stop them. So each
rank records, at start, the launchers among its ancestors on this node (the deepspeed runner and per-node
launcher, torchrun, mpirun/mpiexec and MPI's per-node proxies) and, after every optimizer step, checks that each
is still the same live process (its start time tells a reused pid apart; a zombie counts as gone). When one went,
`preempt.StopRequest` sets its flag as a signal would: every rank stops after the same step, with a checkpoint,
preempted.json and exit code 75 (docs/reliability.md, "Pre-emption").

Only this node's process tree is watched: under pdsh the runner runs on node 0 behind ssh and is no rank's
ancestor (its own SIGTERM/SIGINT handler stops the nodes' launchers there). A plain process has nothing to watch.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

RUNNER, PER_NODE, TORCHRUN, MPIRUN, MPI_PROXY = "runner", "per_node", "torchrun", "mpirun", "mpi_proxy"
# the program a launcher runs (a Python script's file name, a `-m` module, an executable's name) -> its kind
PROGRAMS = {
    "deepspeed": RUNNER, "ds": RUNNER, "deepspeed.pt": RUNNER, "deepspeed.launcher.runner": RUNNER,
    "deepspeed.launcher.launch": PER_NODE,
    "torchrun": TORCHRUN, "torch.distributed.run": TORCHRUN, "torch.distributed.launch": TORCHRUN,
    "mpirun": MPIRUN, "mpiexec": MPIRUN, "mpiexec.hydra": MPIRUN, "orterun": MPIRUN, "prterun": MPIRUN,
    "hydra_pmi_proxy": MPI_PROXY, "orted": MPI_PROXY, "prted": MPI_PROXY,
}  # fmt: skip
WHAT = {RUNNER: "the deepspeed runner", PER_NODE: "the deepspeed per-node launcher", TORCHRUN: "torchrun's agent",
        MPIRUN: "the MPI launcher", MPI_PROXY: "the MPI per-node proxy"}  # fmt: skip
_PYTHON = re.compile(r"python[0-9.]*")


@dataclass(frozen=True)
class Launcher:
    """One launcher process among this rank's ancestors."""

    pid: int
    create_time: float  # with the pid, the identity of the process (pids get reused; `process` compares it)
    kind: str  # RUNNER, PER_NODE, TORCHRUN, MPIRUN or MPI_PROXY
    program: str  # as its command line names it: deepspeed, deepspeed.launcher.launch, mpiexec.hydra, ...
    args: tuple[str, ...] = ()  # its arguments after the program (the runner's flags, the launcher's --world_info)
    process: Any = field(default=None, compare=False, repr=False)  # the psutil.Process, kept for the checks

    def __str__(self) -> str:
        return f"{WHAT[self.kind]} ({self.program}, pid {self.pid})"

    def alive(self) -> bool:
        """Still the same process, and not a zombie (a killed runner stays one until its parent waits for it)."""
        import psutil

        try:
            with self.process.oneshot():
                return self.process.is_running() and self.process.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
        except psutil.AccessDenied:  # cannot tell: do not stop a run for it
            return True


def program(cmdline: Sequence[str]) -> tuple[str, list[str]]:
    """(the program a command line runs, its arguments): under a Python interpreter the `-m` module or the
    script's file name (`python /venv/bin/deepspeed ...` is how a console script shows), else the executable's
    file name. ("", []) for `python -c` or an interpreter alone."""
    if not cmdline:
        return "", []
    exe = os.path.basename(cmdline[0])
    if not _PYTHON.fullmatch(exe):
        return exe, list(cmdline[1:])
    args = list(cmdline[1:])
    while args:
        arg = args.pop(0)
        if arg == "--" or not arg.startswith("-") or arg == "-":
            script = (args.pop(0) if args else "") if arg == "--" else arg
            return os.path.basename(script), args
        if arg.startswith("--"):  # --version, --help: no value
            continue
        for j, letter in enumerate(arg[1:], 2):  # -u, -um module, -mmodule, -c code, -W arg, -X opt
            if letter == "c":
                return "", []
            if letter == "m":
                return (arg[j:] or (args.pop(0) if args else "")), args
            if letter in "WX":
                if j == len(arg) and args:  # the value is the next argument
                    args.pop(0)
                break
    return "", []


def flag(args: Sequence[str], *names: str) -> str | None:
    """The value a command line gives any of the options `names` (`--name value` or `--name=value`; the last one
    counts, as argparse has it), or None."""
    value = None
    for i, arg in enumerate(args):
        key, eq, rest = arg.partition("=")
        if key in names:
            value = rest if eq else (args[i + 1] if i + 1 < len(args) else None)
    return value


def ancestry(pid: int | None = None) -> list[Launcher]:
    """The launchers among the ancestors of `pid` (this process) on this node, nearest first."""
    import psutil

    try:
        parents = psutil.Process(pid).parents()
    except psutil.Error:
        return []
    found = []
    for proc in parents:
        try:
            with proc.oneshot():
                cmdline, name, created = proc.cmdline(), proc.name(), proc.create_time()
        except psutil.Error:  # gone meanwhile, or another user's process that cannot be read
            continue
        prog, args = program(cmdline) if cmdline else (name, [])
        if prog in PROGRAMS:
            found.append(Launcher(proc.pid, created, PROGRAMS[prog], prog, tuple(args), proc))
    return found


class LauncherWatch:
    """This rank's launchers, checked after every optimizer step: `gone()` names the first that went."""

    def __init__(self, launchers: Sequence[Launcher] = ()) -> None:
        self.launchers = list(launchers)

    @classmethod
    def of_this_process(cls) -> LauncherWatch:
        return cls(ancestry())

    def gone(self) -> Launcher | None:
        """The nearest launcher that is no longer there, or None (tens of us a launcher: docs/reliability.md)."""
        return next((launcher for launcher in self.launchers if not launcher.alive()), None)

    def __str__(self) -> str:
        return ", ".join(map(str, self.launchers)) or "none"
