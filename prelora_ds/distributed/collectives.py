"""Every collective the package itself issues, on a gloo group of its own (docs/gpu.md).

On a GPU cluster `deepspeed.init_distributed` starts the default group with NCCL, whose backend takes
CUDA tensors only; the package's own statistics are small CPU vectors (norm sums, the window loss,
validation counts, skipped images, the switch decision, checkpoint barriers and manifests). Sending them through the
default group fails there ("No backend type associated with device type cpu"), so they go through a
gloo group created beside it, which takes CPU tensors whatever the default backend is. DeepSpeed's own
collectives (ZeRO's reduce-scatter and all-gather) stay on DeepSpeed's group.

There is no world-size-1 shortcut: one process with a process group runs the same collectives as 64,
so a one-GPU check exercises this code. Every rank must call these functions in the same order.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as tdist

from prelora_ds.errors import TrainingError

# a word of its own, so that a path such as runs/timeout_test/ in a message does not count
_TIMEOUT = re.compile(r"(?<![\w/])(timed? ?out|timeout)(?![\w/])", re.IGNORECASE)


def is_timeout(exc: BaseException) -> bool:
    """A collective that gave up waiting (gloo/NCCL word it differently; both say 'time(d) out')."""
    return isinstance(exc, RuntimeError) and bool(_TIMEOUT.search(str(exc)))

# What gloo and NCCL say when the other end of a collective went away (its process or node died, or the link did)
# instead of timing out: a killed process's kernel closes its sockets, so the survivors learn it at once.
_PEER_LOST = re.compile(
    r"Connection closed by peer|Connection reset by peer|Broken pipe|remote process exited or there was a network "
    r"error",
    re.IGNORECASE,
)

# (the default group it was made beside, the gloo group); remade when the default group is replaced
_STATS: tuple[object, object] | None = None


def init_stats_group(timeout_s: float | None = None):
    """Create the statistics group (a collective on the default group: every rank calls it once, right after
    the default group starts). `timeout_s` bounds each of its collectives; None: the default group's."""
    global _STATS
    if not (tdist.is_available() and tdist.is_initialized()):
        raise RuntimeError(
            "prelora_ds.dist needs a started process group: call prelora_ds.distributed.launch.init_distributed() (or "
            "torch.distributed.init_process_group) first."
        )
    world = tdist.group.WORLD
    if _STATS is not None and _STATS[0] is world:
        return _STATS[1]
    timeout = timedelta(seconds=timeout_s) if timeout_s is not None else _default_timeout(world)
    group = tdist.new_group(backend="gloo", timeout=timeout, group_desc="prelora_stats")
    _STATS = (world, group)
    return group


def forget_stats_group() -> None:
    """Drop the reference to the statistics group (after `destroy_process_group` destroyed it)."""
    global _STATS
    _STATS = None


def _default_timeout(world) -> timedelta | None:
    """The default group's own timeout, so a group made on first use waits as long as the default one."""
    for device in ("cpu", "cuda"):  # gloo on CPU; NCCL (or any CUDA-only backend) on GPU
        try:
            return world._get_backend(torch.device(device)).options._timeout
        except (AttributeError, RuntimeError):
            continue
    return None  # torch's default for gloo groups


def peer_lost(exc: BaseException) -> bool:
    """A collective that failed because another rank's connection closed (gloo: 'Connection closed by peer')."""
    return isinstance(exc, RuntimeError) and bool(_PEER_LOST.search(str(exc)))


def stats_group():
    """The gloo group for the package's statistics (created on first use if the caller started the default
    group itself; every rank reaches its first collective at the same point, so they create it together)."""
    return init_stats_group()


def rank() -> int:
    return tdist.get_rank()


def world_size() -> int:
    return tdist.get_world_size()


def _all_reduce(values: list[float], op) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    tdist.all_reduce(t, op=op, group=stats_group())
    return t.tolist()


def all_reduce_sum(values: list[float]) -> list[float]:
    """SUM over ranks (float64, so sums of norms and losses do not depend on the order of ranks in practice)."""
    return _all_reduce(values, tdist.ReduceOp.SUM)


def all_reduce_max(values: list[float]) -> list[float]:
    """MAX over ranks."""
    return _all_reduce(values, tdist.ReduceOp.MAX)


def agree(flag: bool, what: str) -> bool:
    """The common decision of all ranks: MIN and MAX of the flag in one all-reduce; raises naming `what` when
    they differ (a decision must be computed from all-reduced statistics only)."""
    hi, neg_lo = all_reduce_max([float(flag), -float(flag)])
    if hi != -neg_lo:
        raise RuntimeError(
            f"ranks disagree on {what} (rank {rank()} says {flag}); the decision must be computed from "
            "all-reduced statistics only. Check that every rank runs the same code and config."
        )
    return bool(hi)


def all_gather_object(obj: object) -> list:
    """Every rank's `obj` (small and picklable: a checkpoint's file entries, a list of problems), in rank order, on
    every rank. Also a barrier: no rank returns before every rank has called it."""
    gathered: list = [None] * world_size()
    tdist.all_gather_object(gathered, obj, group=stats_group())
    return gathered


def barrier() -> None:
    """Wait for every rank (on the statistics group: bounded by its timeout, and no CUDA stream involved)."""
    tdist.barrier(group=stats_group())


def broadcast_rng_state() -> None:
    """Every rank takes rank 0's CPU random state (after rank 0 alone drew something the others did not, e.g. a
    model's initial weights), so the random numbers drawn next are the same on every rank."""
    state = torch.get_rng_state()
    tdist.broadcast(state, src=0, group=stats_group())
    torch.set_rng_state(state)


def broadcast_tensor(value: torch.Tensor | None, src: int, shape: torch.Size, device: torch.device,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:  # fmt: skip
    """`src`'s `value` on every rank (the others pass None), on `device`. The one collective here on the training
    group rather than the statistics group: it carries model state through a rebuild (engine/stream.py), bulk data
    that belongs on the accelerator's fabric, so `device` is the accelerator's (NCCL takes CUDA tensors only)."""
    if value is not None:
        out = value.to(device, dtype).contiguous()
    else:
        out = torch.empty(shape, dtype=dtype, device=device)
    tdist.broadcast(out, src=src)
    return out


class NamedCollectives:
    """`with named("the all-reduce of ...")`: a rank that times out waiting inside the block, or learns that a
    peer's process or node died (its sockets closed at once), stops with a TrainingError that names the operation,
    the timeout and the last complete checkpoint (`last_checkpoint()`, asked only then)."""

    def __init__(self, rank: int, timeout_s: float, last_checkpoint: Callable[[], str]) -> None:
        self.rank, self.timeout_s, self.last_checkpoint = rank, timeout_s, last_checkpoint

    @contextlib.contextmanager
    def __call__(self, what: str):
        try:
            yield
        except RuntimeError as exc:
            if isinstance(exc, TrainingError) or not (is_timeout(exc) or peer_lost(exc)):
                raise
            raise self.error(what, exc) from exc

    def error(self, what: str, exc: BaseException) -> TrainingError:
        why = (
            "failed: another rank closed its connection (its process or node died)"
            if peer_lost(exc)
            else f"timed out after train.collective_timeout_s={self.timeout_s:g} s waiting for another rank (dead, "
            "hung or cut off)"
        )
        return TrainingError(
            f"rank {self.rank}: {what} {why}. The last complete checkpoint is {self.last_checkpoint()}; restart the "
            f"job with --resume. ({str(exc).splitlines()[0][:200]})"
        )
