"""Fault injection for drills and tests: real failures at chosen steps, switched on by an environment variable.

  PRELORA_FAULTS="kill@12:1"          rank 1 SIGKILLs itself right after optimizer step 12
  PRELORA_FAULTS="kill_in_save@16:1"  rank 1 SIGKILLs itself inside the save of step 16, after DeepSpeed wrote
                                      its files and before the checkpoint is declared complete
  PRELORA_FAULTS="nan@5,nan@9:0"      the loss of step 5 (every rank) / of step 9 on rank 0 is NaN
  PRELORA_FAULTS="nan_weights@6"      after step 6 the fp32 master of block 0's first matrix is NaN (a diverged
                                      run as the norm statistics see it)
  PRELORA_FAULTS="hang@8:1"           rank 1 stops working after step 8 (a hung node: the others wait)
  PRELORA_FAULTS="term@8:0"           rank 0 sends SIGTERM to its launcher (mpiexec, which forwards it to every
                                      rank; the deepspeed launcher's per-node process, which terminates every
                                      rank; itself in a plain process)
  PRELORA_FAULTS="term_runner@8:0"    rank 0 sends SIGTERM to the outermost launcher of its node (the `deepspeed`
                                      runner, which dies without passing it on: the ranks see it gone; mpiexec;
                                      torchrun; itself in a plain process)
  PRELORA_FAULTS="term_self@8:1"      rank 1 gets SIGTERM, the other ranks none (a signal that reached one node)
  PRELORA_FAULTS="usr1_self@8:0"      rank 0 gets SIGUSR1 (SLURM's --signal=USR1@<seconds>), the others none
  PRELORA_FAULTS="term_in_save@8:0"   rank 0 gets SIGTERM inside the save of step 8 (a second signal while stopping)

  PRELORA_FAULTS="kill_in_switch@12:0" rank 0 SIGKILLs itself inside the engine rebuild of step 12's switch, after
                                      the old engine was released and before the new one exists

  PRELORA_FAULTS="kill@30:1#0"        the same in torchrun's first attempt only (TORCHELASTIC_RESTART_COUNT=0): the
                                      agent restarts its workers with the same environment, and a restart that
                                      resumes before step 30 would meet the fault again

  PRELORA_FAULTS="pause@22:0"         rank 0 waits after step 22 until a signal comes (e.g. the SIGTERM of torchrun's
                                      agent when a node joins), then goes on to the stop agreement of that step

Several faults are comma-separated; without `:RANK` a fault hits every rank, without `#ATTEMPT` every attempt.
Nothing is mocked: the process really dies or hangs, the NaN really flows through DeepSpeed. Unset, every hook
is a no-op.

A checkpoint damaged on disk after it was complete is made with `damage(path, how)` on its files (tests, drills):
`truncate` (a copy cut short) or `flip` (one bit of a tensor's data, which torch.load would read silently).
"""

from __future__ import annotations

import functools
import os
import re
import signal
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from prelora_ds.log import EVERY_RANK, logger

ENV = "PRELORA_FAULTS"
KINDS = ("kill", "kill_in_save", "kill_in_switch", "nan", "nan_weights", "hang", "pause", "term", "term_runner",
         "term_self", "usr1_self", "term_in_save")
_PATTERN = re.compile(r"^(?P<kind>[a-z0-9_]+)@(?P<step>\d+)(?::(?P<rank>\d+))?(?:#(?P<attempt>\d+))?$")


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    rank: int | None  # None: every rank
    attempt: int | None = None  # torchrun's restart count it fires in; None: every attempt


def parse(text: str) -> list[Fault]:
    faults = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        m = _PATTERN.match(item)
        if not m or m["kind"] not in KINDS:
            raise ValueError(
                f"{ENV}: cannot read {item!r}; write KIND@STEP[:RANK][#ATTEMPT] with KIND one of "
                f"{', '.join(KINDS)}, e.g. kill@12:1 or kill@12:1#0 (torchrun's first attempt only)."
            )
        faults.append(Fault(m["kind"], int(m["step"]), None if m["rank"] is None else int(m["rank"]),
                            None if m["attempt"] is None else int(m["attempt"])))
    return faults


@functools.cache
def active() -> tuple[Fault, ...]:
    """The faults of this process's environment (read once; `train` checks them before any process group)."""
    return tuple(parse(os.environ.get(ENV, "")))


def due(kind: str, step: int, rank: int) -> bool:
    from prelora_ds.distributed.elastic import restart_count

    attempt = restart_count()
    return any(f.kind == kind and f.step == step and f.rank in (None, rank) and f.attempt in (None, attempt)
               for f in active())


def after_step(step: int, rank: int, module=None) -> None:
    """Hook after each optimizer step (before any checkpoint of that step); `module`: the engine's module."""
    if due("nan_weights", step, rank) and module is not None:
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

        name, param = next((n, p) for n, p in module.named_parameters()  # a weight the norm statistics read
                           if p.requires_grad and ".blocks.0." in f".{n}" and p.dim() == 2)
        logger.info(f"[{ENV}] rank {rank}: NaN into the fp32 master of {name} after step {step}", extra=EVERY_RANK)
        safe_set_full_fp32_param(param, torch.full_like(safe_get_full_fp32_param(param), float("nan")))
    if due("kill", step, rank):
        logger.info(f"[{ENV}] rank {rank}: SIGKILL after step {step}", extra=EVERY_RANK)
        os.kill(os.getpid(), signal.SIGKILL)
    if due("hang", step, rank):
        logger.info(f"[{ENV}] rank {rank}: hanging after step {step}", extra=EVERY_RANK)
        # alive but never reaching the next collective; a launcher's SIGTERM still ends it (the pre-emption
        # handler only records signals, so end here the way the default action would)
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
        signal.sigwait([signal.SIGTERM])
        os._exit(128 + signal.SIGTERM)
    if due("pause", step, rank):
        logger.info(f"[{ENV}] rank {rank}: pausing after step {step} until a signal comes", extra=EVERY_RANK)
        signal.pause()  # returns once a handler ran (the pre-emption handler records SIGTERM/SIGINT/SIGUSR1)
    for kind, outermost in (("term", False), ("term_runner", True)):
        if due(kind, step, rank):
            target = _launcher_pid(outermost)
            logger.info(f"[{ENV}] rank {rank}: SIGTERM to {'the launcher' if target != os.getpid() else 'itself'} "
                        f"(pid {target}) after step {step}", extra=EVERY_RANK)
            os.kill(target, signal.SIGTERM)
    for kind, sig in (("term_self", signal.SIGTERM), ("usr1_self", signal.SIGUSR1)):
        if due(kind, step, rank):
            logger.info(f"[{ENV}] rank {rank}: {sig.name} to this rank only after step {step}", extra=EVERY_RANK)
            os.kill(os.getpid(), sig)


def in_save(step: int, rank: int) -> None:
    """Hook inside `checkpoint.save`, between DeepSpeed's files and the COMPLETE marker."""
    if due("kill_in_save", step, rank):
        logger.info(f"[{ENV}] rank {rank}: SIGKILL while saving step {step}", extra=EVERY_RANK)
        os.kill(os.getpid(), signal.SIGKILL)
    if due("term_in_save", step, rank):
        logger.info(f"[{ENV}] rank {rank}: SIGTERM while saving step {step}", extra=EVERY_RANK)
        os.kill(os.getpid(), signal.SIGTERM)


def in_rebuild(step: int, rank: int) -> None:
    """Hook inside `PhaseEngine.rebuild`, between the old engine's release and the new engine's build."""
    if due("kill_in_switch", step, rank):
        logger.info(f"[{ENV}] rank {rank}: SIGKILL inside the switch of step {step}", extra=EVERY_RANK)
        os.kill(os.getpid(), signal.SIGKILL)


def loss_factor(step: int, rank: int) -> float:
    """1.0, or NaN for an injected non-finite loss at `step` (the step being computed)."""
    return float("nan") if due("nan", step, rank) else 1.0


def _launcher_pid(outermost: bool = False) -> int:
    """The process a scheduler would signal: the nearest launcher above this rank that is not an MPI proxy (mpiexec,
    which forwards signals to every rank; the deepspeed launcher's per-node process or torchrun, which terminate
    their ranks), with `outermost` the farthest one on this node (the `deepspeed` runner), or this process when it
    runs alone."""
    from prelora_ds.distributed.supervisor import MPI_PROXY, ancestry

    launchers = [launcher for launcher in ancestry() if launcher.kind != MPI_PROXY]
    if not launchers:
        return os.getpid()
    return launchers[-1 if outermost else 0].pid


def damage(path: str | os.PathLike, how: str, keep_bytes: int = 1000) -> str:
    """Damage one checkpoint file in place; returns what was done, in words.

    `truncate`: cut the file to `keep_bytes` (`truncate -s 1000`: a copy or a write that stopped short; torch.load
    fails with "failed finding central directory"). `flip`: invert one bit in the middle of the largest tensor's data
    of a torch zip file (stored uncompressed; the middle of the file for a file without tensors): torch.load reads
    it without complaint and the model gets another value."""
    path = Path(path)
    if how == "truncate":
        os.truncate(path, keep_bytes)
        return f"{path.name} cut to {keep_bytes} bytes"
    if how != "flip":
        raise ValueError(f"damage: how is 'truncate' or 'flip', not {how!r}")
    offset = path.stat().st_size // 2
    tensors = []
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            tensors = [i for i in archive.infolist() if "/data/" in i.filename and i.file_size]
    if tensors:
        record = max(tensors, key=lambda i: i.file_size)
        with open(path, "rb") as f:  # the record's data follows its local header (30 bytes, name, extra field)
            f.seek(record.header_offset + 26)
            name_len, extra_len = struct.unpack("<HH", f.read(4))
        offset = record.header_offset + 30 + name_len + extra_len + record.file_size // 2
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x10]))
    return f"{path.name}: one bit flipped at byte {offset}"

