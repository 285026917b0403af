"""Process-group start for every launch mode: the deepspeed launcher, mpirun, or a plain process.

The deepspeed launcher (and torchrun) set RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT/LOCAL_RANK.
Under mpirun those come from mpi4py here (DeepSpeed's own discovery picks `hostname -I`, which is
not loopback on a single host). A plain `python -m prelora_ds.train` runs as a world of one.
Before the group starts, GLOO_SOCKET_IFNAME defaults to the interface that routes to MASTER_ADDR, and a
rank that has not joined the others after train.rendezvous_timeout_s stops naming what to check
(distributed/netif.py).
"""

from __future__ import annotations

import atexit
import os
import socket
import sys
import time
import traceback
from datetime import timedelta

from prelora_ds.errors import RendezvousError

REQUIRED_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")
MPI_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE")


def launched_by() -> str:
    if all(k in os.environ for k in REQUIRED_ENV):
        return "launcher"
    if any(k in os.environ for k in MPI_ENV):
        return "mpi"
    return "single"


def free_port() -> int:
    """A TCP port nobody listens on right now (bound on 127.0.0.1, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mpi_env() -> None:
    from mpi4py import MPI  # the `mpi` extra

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    hosts = comm.allgather(MPI.Get_processor_name())
    if len(set(hosts)) == 1:
        addr = "127.0.0.1"
    else:
        # node 0's address as another node resolves its name: node 0's own lookup of its hostname is often
        # 127.0.1.1 (Debian's /etc/hosts), which no other node can reach
        other = next(r for r, h in enumerate(hosts) if h != hosts[0])
        found = None
        if rank == other:
            try:
                found = socket.gethostbyname(hosts[0])
            except OSError as exc:  # every rank must learn it, or the others wait in bcast forever
                found = f"error: {exc}"
        addr = comm.bcast(found, root=other)
        if addr.startswith("error: "):
            raise RendezvousError(
                f"node 0's name {hosts[0]!r} (MPI's processor name) does not resolve on {hosts[other]} ({addr[7:]}); "
                "add it to DNS or /etc/hosts on every node, or launch with the deepspeed launcher and --master_addr."
            )
    port = os.environ.get("MASTER_PORT") or str(comm.bcast(free_port() if rank == 0 else None, root=0))
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(size),
        LOCAL_RANK=str(sum(h == hosts[rank] for h in hosts[:rank])),
        MASTER_ADDR=addr,
        MASTER_PORT=port,
    )


FAILED_EXIT_GRACE_S = 5.0  # how long a failing rank waits at exit for the others to fail with it (under mpirun)


def end_failed_job(code: int, error: BaseException | None = None) -> None:
    """Under mpirun, a rank that exits with `code` (not 0, not a pre-emption's 75) ends the whole job when it fails
    alone. mpi4py finalises MPI at exit, and MPI_Finalize waits for every rank: beside a hung rank (after a
    collective timeout) it would wait for ever, and the job with it. (Finalised early instead, MPI no longer lets
    mpiexec end a job when a rank exits non-zero.)

    So the failing rank first waits up to FAILED_EXIT_GRACE_S in a non-blocking barrier. Ranks that fail together
    (an agreed stop: non-finite norms, damaged checkpoints) all reach it within a second and exit normally, each
    with its whole output. A rank left alone calls MPI_Abort, which ends every rank (mpiexec exits `code`), after
    printing `error`'s traceback (an uncaught exception) and flushing its output. The deepspeed launcher and torchrun
    end a job on a rank's failure by themselves."""
    from prelora_ds.distributed.preempt import EXIT_CODE

    if code in (0, EXIT_CODE) or "mpi4py.MPI" not in sys.modules or not any(k in os.environ for k in MPI_ENV):
        return  # MPI was not started here (_mpi_env): a launcher's job
    from mpi4py import MPI

    if not MPI.Is_initialized() or MPI.Is_finalized():
        return
    together = MPI.COMM_WORLD.Ibarrier()
    deadline = time.monotonic() + FAILED_EXIT_GRACE_S
    while not together.Test():
        if time.monotonic() > deadline:
            if error is not None:
                traceback.print_exception(error)
            sys.stdout.flush()
            sys.stderr.flush()
            MPI.COMM_WORLD.Abort(code)
        time.sleep(0.05)


def world_size_hint() -> int:
    """World size before the process group exists (for validating batch arithmetic early)."""
    for key in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE"):
        if key in os.environ:
            return int(os.environ[key])
    return 1


def init_distributed(timeout_s: float, rendezvous_timeout_s: float = 600.0) -> tuple[int, int, int]:
    """Start the process group (gloo on CPU, nccl on GPU); returns (rank, local_rank, world_size).

    Raises RendezvousError when this rank cannot join the others; ends the process (exit 1, same message)
    when joining takes longer than `rendezvous_timeout_s`."""
    from prelora_ds.distributed import netif

    mode = launched_by()
    if mode == "mpi":
        _mpi_env()
    elif mode == "single":
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    try:
        netif.choose_gloo_interface(log=os.environ["LOCAL_RANK"] == "0")
    except OSError as exc:
        raise RendezvousError(str(exc)) from exc
    import deepspeed
    import deepspeed.ops
    import torch

    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        # Before the group starts: NCCL binds its communicator (and every later CUDA allocation) to the
        # current device, which is GPU 0 on every rank unless it is set here.
        torch.cuda.set_device(local_rank)
        # A collective that outlives the group's timeout makes NCCL's watchdog abort the process (instead of
        # hanging the job); torch's default, stated so that an inherited 0 cannot switch it off unnoticed.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
    # The shared-memory comm op is JIT-built at group start (30-60 s on CPU) and unused by training.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    from prelora_ds.distributed import collectives, elastic

    try:
        with netif.RendezvousWatchdog(rendezvous_timeout_s):
            if elastic.shares_agent_store():  # torchrun: a store of this worker group's own (distributed/elastic.py)
                _init_elastic_group(timedelta(seconds=timeout_s), local_rank)
            deepspeed.init_distributed(auto_mpi_discovery=False, timeout=timedelta(seconds=timeout_s), verbose=False)
            collectives.init_stats_group(timeout_s)  # the package's own collectives (CPU tensors) beside DeepSpeed's
    except (RuntimeError, ValueError) as exc:  # gloo/NCCL/store errors (DistNetworkError is a RuntimeError)
        if netif.address_in_use(exc):  # a busy port on this host, not a network fault
            raise RendezvousError(netif.port_in_use_help()) from exc
        raise RendezvousError(f"{netif.rendezvous_help()} ({str(exc).splitlines()[0][:300]})") from exc
    # destroyed when the process exits, not when a run ends: a process may run several (tests), and DeepSpeed keeps
    # its groups cached between them
    atexit.unregister(shutdown_distributed)  # once, however many runs start in this process
    atexit.register(shutdown_distributed)
    return collectives.rank(), local_rank, collectives.world_size()


def _init_elastic_group(timeout: timedelta, local_rank: int) -> None:
    """The default group on the worker group's own store; `deepspeed.init_distributed` then adopts it (it starts a
    group only when none exists), with the backend and device binding it would have chosen itself."""
    import torch
    import torch.distributed as tdist
    from deepspeed.accelerator import get_accelerator

    from prelora_ds.distributed import elastic

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = elastic.group_store(rank, world, timeout)
    kwargs = {}
    if torch.cuda.is_available() and world > 1:  # as DeepSpeed binds NCCL's communicator to this rank's GPU
        kwargs["device_id"] = torch.device("cuda", local_rank)
    tdist.init_process_group(get_accelerator().communication_backend_name(), store=store, rank=rank,
                             world_size=world, timeout=timeout, **kwargs)


def shutdown_distributed() -> None:
    """Destroy every process group (DeepSpeed's, the package's gloo group) before the interpreter exits (registered
    with atexit by `init_distributed`; idempotent).

    A gloo group left to the interpreter's teardown can abort the process after a finished run ("terminate
    called without an active exception", exit -6: its C++ worker threads outlive Python); on NCCL it leaves
    pending work unfinished. Local: no collective, so a rank whose peers are gone can still call it."""
    import torch.distributed as tdist

    from prelora_ds.distributed import collectives

    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()
    collectives.forget_stats_group()
