"""Rank-0 monitoring: TensorBoard scalars/histograms/text and a tqdm progress bar."""

from __future__ import annotations

import re
import resource
import sys
from pathlib import Path

import torch
from tqdm import tqdm

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def memory_bytes() -> int:
    """Peak accelerator memory on GPU, else the process's peak RSS, since the last `reset_peak_memory`."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    try:  # Linux: VmHWM, the peak RSS that `reset_peak_memory` can reset
        return int(re.search(r"VmHWM:\s+(\d+) kB", _STATUS.read_text())[1]) * 1024
    except (OSError, TypeError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # never reset
        return int(peak if sys.platform == "darwin" else peak * 1024)


def reset_peak_memory() -> None:
    """Start a new peak (at a phase change, so each phase reports its own)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        _CLEAR_REFS.write_text("5")  # Linux: resets VmHWM to the current RSS
    except OSError:
        pass  # elsewhere the peak covers the whole process


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
