"""What a run did, bit for bit: the per-step training loss and validation top-1 (TensorBoard's float32 values, as
hex), the phase timeline, the ranks and the SHA-256 of the merged export's tensors. A refactor must leave it unchanged.

Float results depend on the CPU's kernels, so a fingerprint is compared only on the platform it was recorded on
(`platform()`); elsewhere, record it again from a commit known to be good:

    python -m prelora_ds.testing.golden RECORD_FILE NAME=RUN_DIR [NAME=RUN_DIR ...]
"""

from __future__ import annotations

import hashlib
import json
import platform as _platform
import sys
from pathlib import Path
from typing import Any

from prelora_ds.metrics.readers import read_json, scalars
from prelora_ds.metrics.tags import tag

PHASE_KEYS = ("name", "start_step", "end_step", "trainable_params", "total_params")


def platform() -> dict[str, str]:
    """What decides float results on a CPU: torch's version and kernel level, the processor model."""
    import torch

    model = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                      if line.startswith("model name")), "")  # fmt: skip
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "processor": model or _platform.processor(), "machine": _platform.machine()}  # fmt: skip


def fingerprint(run_dir: Path) -> dict[str, Any]:
    tb = scalars(run_dir)
    summary = read_json(run_dir / "summary.json")
    return {
        "train/loss": [[step, float(v).hex()] for step, v in tb[tag("loss")]],  # keys: the names at the recording
        "val/top1": [[step, float(v).hex()] for step, v in tb[tag("val_top1")]],
        "phases": [{k: p[k] for k in PHASE_KEYS} for p in summary["phases"]],
        "switch_step": summary["switch_step"],
        "ranks": read_json(run_dir / "ranks.json"),
        "model_sha256": tensors_sha256(run_dir / "model_merged.safetensors"),
    }


def tensors_sha256(path: Path) -> str:
    """SHA-256 of every tensor's name, dtype, shape and bytes in name order (not of the file: safetensors writes its
    metadata in no fixed order)."""
    import torch
    from safetensors.torch import load_file

    digest = hashlib.sha256()
    for name, tensor in sorted(load_file(path).items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def record(path: Path, runs: dict[str, Path]) -> None:
    path.write_text(json.dumps({"platform": platform(), "runs": {n: fingerprint(d) for n, d in runs.items()}},
                               indent=1) + "\n")


if __name__ == "__main__":
    record(Path(sys.argv[1]), {a.split("=", 1)[0]: Path(a.split("=", 1)[1]) for a in sys.argv[2:]})
