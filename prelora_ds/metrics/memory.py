"""Peak memory per phase: the accelerator's allocator on GPU, the process's peak RSS (VmHWM) on CPU."""

from __future__ import annotations

import re
import resource
import sys
from pathlib import Path

import torch

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
