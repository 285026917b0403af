"""Cost of the per-step pre-emption agreement (one all-reduce MAX of 3 float64 on the statistics group) and of
the launcher check before it.

  python tools/bench_stop_agreement.py --world 2 --calls 2000

Starts `--world` local processes (a gloo default group, as on CPU ranks; on a GPU cluster the statistics group
is gloo as well, so the cost is the same collective over the nodes' network), times `StopRequest.agreed()` and
prints the median and 99th percentile in microseconds, as JSON. `launcher_check_*` times the check alone
(`LauncherWatch.gone()`) on `--launchers` live ancestors of each process (2: a deepspeed rank's per-node
launcher and runner).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from prelora_ds.cli import HelpFormatter
from prelora_ds.testing.harness import free_port


def percentiles(times: list[float]) -> tuple[float, float]:
    times = sorted(times)
    return 1e6 * statistics.median(times), 1e6 * times[int(0.99 * len(times))]


def launcher_check(calls: int, launchers: int) -> list[float]:
    """Seconds of each `LauncherWatch.gone()` on this process's nearest `launchers` ancestors (their kind does
    not change the cost: each is one read of /proc/PID/stat)."""
    import psutil

    from prelora_ds.distributed.supervisor import RUNNER, Launcher, LauncherWatch

    watch = LauncherWatch([Launcher(p.pid, p.create_time(), RUNNER, p.name(), (), p)
                           for p in psutil.Process().parents()[:launchers]])
    assert len(watch.launchers) == launchers, "not enough ancestors"
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        assert watch.gone() is None
        times.append(time.perf_counter() - t0)
    return times


def worker(rank: int, world: int, calls: int, port: int, launchers: int, out: dict) -> None:
    import torch.distributed as tdist

    from prelora_ds.distributed import collectives, preempt

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    collectives.init_stats_group(60)
    request = preempt.StopRequest()
    for _ in range(50):  # warm-up
        request.agreed()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        request.agreed()
        times.append(time.perf_counter() - t0)
    check = launcher_check(calls, launchers)
    if rank == 0:
        out["median_us"], out["p99_us"] = percentiles(times)
        out["launcher_check_median_us"], out["launcher_check_p99_us"] = percentiles(check)
    collectives.barrier()  # neither rank tears the groups down while the other still uses them
    tdist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--world", type=int, default=2, help="local processes (gloo ranks)")
    p.add_argument("--calls", type=int, default=2000, help="timed calls per rank, of each kind")
    p.add_argument("--launchers", type=int, default=2, help="ancestors the launcher check watches")
    p.add_argument("--port", type=int, default=None, help="rendezvous port (default: a free one)")
    args = p.parse_args()
    import torch.multiprocessing as mp  # after the arguments: --help does not wait for torch

    if args.port is None:
        args.port = free_port()
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(worker, args=(args.world, args.calls, args.port, args.launchers, out), nprocs=args.world)
        print(json.dumps({"world": args.world, "calls": args.calls, "launchers": args.launchers, **out}))


if __name__ == "__main__":
    main()
