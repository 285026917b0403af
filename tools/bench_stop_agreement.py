"""Cost of the per-step pre-emption agreement (one all-reduce MAX of 3 float64 on the statistics group).

  python tools/bench_stop_agreement.py --world 2 --calls 2000

Starts `--world` local processes (a gloo default group, as on CPU ranks; on a GPU cluster the statistics group
is gloo as well, so the cost is the same collective over the nodes' network), times `StopRequest.agreed()` and
prints the median and 99th percentile in microseconds, as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch.multiprocessing as mp

from prelora_ds.testing.harness import free_port


def worker(rank: int, world: int, calls: int, port: int, out: dict) -> None:
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
    if rank == 0:
        times.sort()
        out["median_us"] = 1e6 * statistics.median(times)
        out["p99_us"] = 1e6 * times[int(0.99 * len(times))]
    collectives.barrier()  # neither rank tears the groups down while the other still uses them
    tdist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--port", type=int, default=None, help="rendezvous port (default: a free one)")
    args = p.parse_args()
    if args.port is None:
        args.port = free_port()
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(worker, args=(args.world, args.calls, args.port, out), nprocs=args.world)
        print(json.dumps({"world": args.world, "calls": args.calls, **out}))


if __name__ == "__main__":
    main()
