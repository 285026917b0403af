"""DeepSpeed checkpoints with the loop state beside them, a crash-safe `latest`, and keep-last-K.

Layout of `checkpoints/<tag>/`: DeepSpeed's own files (module, ZeRO partitions per rank), plus
- `trainer_state.json` (rank 0): step, epoch, position in the epoch, phase, ranks, history,
  convergence windows; readable *before* an engine exists, so a resume can rebuild the phase's
  structure first;
- `rank<R>.pt`: that rank's RNG states and pending loss sums;
- `frozen_fp32.pt` (rank 0, phases with a frozen base): the base's exact fp32 values (SPEC §4).
`latest` is written by us, atomically, only after every rank finished writing: a crash while saving
leaves `latest` on the previous complete checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

STATE_FILE = "trainer_state.json"
COMPLETE_FILE = "COMPLETE"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(
    engine,
    ckpt_dir: Path,
    step: int,
    trainer_state: dict[str, Any],
    rank_state: dict[str, Any],
    frozen_fp32: dict[str, torch.Tensor] | None,
    rank: int,
    keep: int,
) -> Path:
    """Save on every rank (collective). Returns the tag directory."""
    tag = tag_for(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step}, save_latest=False)
    tag_dir = ckpt_dir / tag
    torch.save({**rank_state, "rng": rng_state()}, tag_dir / f"rank{rank}.pt")
    if rank == 0:
        if frozen_fp32:
            torch.save(frozen_fp32, tag_dir / "frozen_fp32.pt")
        _atomic_write(tag_dir / STATE_FILE, json.dumps(trainer_state, indent=1))
    _barrier()  # every rank's files are on disk before the checkpoint is declared complete
    if rank == 0:
        _atomic_write(tag_dir / COMPLETE_FILE, tag)
        _atomic_write(ckpt_dir / "latest", tag)
        prune(ckpt_dir, keep)
    _barrier()
    return tag_dir


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Complete checkpoint tags, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.parent.name for p in ckpt_dir.glob(f"*/{COMPLETE_FILE}"))


def prune(ckpt_dir: Path, keep: int) -> None:
    tags = complete_tags(ckpt_dir)
    for tag in tags[:-keep]:
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)


def find_resume(ckpt_dir: Path) -> tuple[str | None, str]:
    """(tag, message): the checkpoint `latest` names if complete, else the newest complete one."""
    tags = complete_tags(ckpt_dir)
    latest_file = ckpt_dir / "latest"
    latest = latest_file.read_text().strip() if latest_file.is_file() else None
    if latest and latest in tags:
        return latest, f"resuming from {ckpt_dir / latest}"
    if tags:
        why = f"'latest' names {latest!r}, which is incomplete or missing" if latest else "no 'latest' file"
        return tags[-1], f"{why}; resuming from the newest complete checkpoint {ckpt_dir / tags[-1]}"
    return None, f"no checkpoint to resume in {ckpt_dir}; starting from step 0"


def read_trainer_state(tag_dir: Path) -> dict[str, Any]:
    return json.loads((tag_dir / STATE_FILE).read_text())


def read_rank_state(tag_dir: Path, rank: int) -> dict[str, Any] | None:
    path = tag_dir / f"rank{rank}.pt"
    return torch.load(path, weights_only=False) if path.is_file() else None


def read_frozen_fp32(tag_dir: Path) -> dict[str, torch.Tensor]:
    path = tag_dir / "frozen_fp32.pt"
    return torch.load(path, weights_only=True) if path.is_file() else {}
