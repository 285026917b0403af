"""Pre-emption, in-process: the signal handlers and the input workers (the launched runs are in test_reliability)."""

from __future__ import annotations

import os
import signal
import time

from prelora_ds.distributed import preempt


def test_stop_request_records_the_first_signal_and_ignores_the_rest():
    before = signal.getsignal(signal.SIGINT)
    request = preempt.StopRequest().install()
    try:
        assert not request.requested
        t0 = time.time()
        os.kill(os.getpid(), signal.SIGUSR1)  # SLURM's --signal=USR1@<seconds>
        os.kill(os.getpid(), signal.SIGINT)  # a second signal while stopping: recorded, nothing else
        assert request.signum == signal.SIGUSR1 and request.extra == 1 and t0 <= request.time <= time.time()
    finally:
        request.uninstall()
    assert signal.getsignal(signal.SIGINT) is before


def test_input_workers_ignore_the_stop_signals():
    """A scheduler signals every process; the DataLoader workers (built as build_loaders builds them) must outlive
    the main process's last step."""
    import torch
    from torch.utils.data import DataLoader

    loader = DataLoader(list(range(12)), batch_size=2, num_workers=2, worker_init_fn=preempt.ignore_in_worker)
    it = iter(loader)
    # one batch from each worker (they take batches in turn): both have run their worker_init_fn; a signal sent
    # after only the first batch could reach the second worker before its handler was set (seen once in CI)
    first = [next(it), next(it)]
    for worker in it._workers:
        os.kill(worker.pid, signal.SIGTERM)
    time.sleep(0.5)
    rest = list(it)
    assert torch.cat([*first, *rest]).tolist() == list(range(12))
