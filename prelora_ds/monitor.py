"""Rank-0 monitoring: TensorBoard scalars/histograms/text and a tqdm progress bar."""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch
from tqdm import tqdm


def memory_bytes() -> int:
    """Peak accelerator memory on GPU, else the process's peak RSS."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class Monitor:
    """No-op on ranks other than 0, so call sites need no rank checks."""

    def __init__(self, out_dir: Path, rank: int, total_steps: int, start_step: int) -> None:
        self.enabled = rank == 0
        self.writer = None
        self.bar = None
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(out_dir / "tb"))
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, mininterval=2.0)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def histogram(self, tag: str, values, step: int) -> None:
        if self.writer:
            self.writer.add_histogram(tag, torch.as_tensor(values, dtype=torch.float32), step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.writer:
            self.writer.add_text(tag, text, step)

    def progress(self, step: int, **postfix: float | str) -> None:
        if self.bar:
            self.bar.n = step
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(0)

    def log(self, msg: str) -> None:
        if self.enabled:
            if self.bar:
                self.bar.write(msg)
            else:
                print(msg, flush=True)

    def close(self) -> None:
        if self.bar:
            self.bar.close()
        if self.writer:
            self.writer.flush()
            self.writer.close()
