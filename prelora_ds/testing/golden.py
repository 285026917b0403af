"""What a run did, bit for bit: the per-step training loss and validation top-1 (TensorBoard's float32 values, as
hex), the phase timeline, the ranks and the SHA-256 of the merged export's tensors. A refactor must leave it unchanged.

Two comparisons with a recording (`differences`):
- on any CPU, what a CPU cannot move: the phase timeline, the switch step and the ranks exactly, every validation
  top-1 to one image, every step's loss to LOSS_TOL;
- on the platform it was recorded on (`platform()`), everything bit for bit: float results depend on the CPU's
  kernels. Elsewhere that part is skipped; record it again from a commit known to be good:

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
# Measured on the demo's recorded runs (switch: 40 steps, relora: 60) on AVX-512 (the recording), AVX2 and SSE4.2
# kernels (ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS, ONEDNN_MAX_CPU_ISA) with 1 and 2 threads a rank: the
# timelines, switch steps and ranks equal (the layer nearest a rank bucket's edge lies 0.049 of a bucket from it;
# those CPUs moved it 0.0036 at most), every top-1 equal, the losses at most 6.0e-6 apart (no growth over the steps).
LOSS_TOL = 5e-4  # 80x that, and 4x under WORLD_TOL (2e-3), what a resume on another world size is held to
# One validation image of the demo's 360: the final models' closest top-2 logits are 1.1e-4 apart and those CPUs
# moved logits by up to 2.2e-5, so another CPU may flip an image at a near tie, and nothing more.
TOP1_TOL = 100 / 360 + 1e-9


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


def differences(got: dict[str, Any], want: dict[str, Any], bitwise: bool) -> list[str]:
    """Where fingerprint `got` departs from the recorded `want`: what no CPU can move (`bitwise=False`), or every
    value, bit for bit (`bitwise=True`: on the recording's platform only)."""
    out = [f"{key}: now {got[key]}, recorded {want[key]}" for key in ("phases", "switch_step", "ranks")
           if got[key] != want[key]]  # fmt: skip
    for key, tol in (("train/loss", LOSS_TOL), ("val/top1", TOP1_TOL)):
        now, then = dict(got[key]), dict(want[key])
        if sorted(now) != sorted(then):
            out.append(f"{key}: steps now {sorted(now)}, recorded {sorted(then)}")
            continue
        if bitwise:
            far = [(s, float.fromhex(now[s]), float.fromhex(then[s])) for s in then if now[s] != then[s]]
        else:
            far = [(s, a, b) for s in then for a, b in [(float.fromhex(now[s]), float.fromhex(then[s]))]
                   if abs(a - b) > tol]  # fmt: skip
        if far:
            out.append(f"{key} differs{'' if bitwise else f' by more than {tol:.3g}'} at (step, now, recorded): "
                       f"{far[:5]}")  # fmt: skip
    if bitwise and got["model_sha256"] != want["model_sha256"]:
        out.append("the merged export's tensors differ")
    return out


def record(path: Path, runs: dict[str, Path]) -> None:
    path.write_text(json.dumps({"platform": platform(), "runs": {n: fingerprint(d) for n, d in runs.items()}},
                               indent=1) + "\n")


if __name__ == "__main__":
    record(Path(sys.argv[1]), {a.split("=", 1)[0]: Path(a.split("=", 1)[1]) for a in sys.argv[2:]})
