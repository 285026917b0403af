"""DeepSpeed checkpoints with the loop state beside them, a crash-safe `latest`, and keep-last-K.

Layout of `checkpoints/<tag>/`: DeepSpeed's own files (module, ZeRO partitions per rank), plus
- `trainer_state.json` (rank 0): step, epoch, position in the epoch, phase, ranks, history,
  convergence windows; readable *before* an engine exists, so a resume can rebuild the phase's
  structure first;
- `rank<R>.pt`: that rank's RNG states and pending loss sums;
- `frozen_fp32.pt` (rank 0, phases with a frozen base): the base's exact fp32 values (the kept copy
  under bf16/fp16, the module's values in fp32: a universal load restores optimizer parameters only; docs/design.md);
- `dormant_moments.pt` (rank 0, in `relora`): the Adam state the base weights had when `relora` froze them, which
  they take up again at the switch to `warmup` (`moments.py`).
- `MANIFEST.json` (rank 0, last before `COMPLETE`): every other file's path, size and CRC-32 (`manifest.py`).
`COMPLETE` and `latest` are written by us, atomically, only after every rank finished writing and the manifest is
written: a crash while saving leaves `latest` on the previous complete checkpoint, and a resume skips the incomplete
one, saying so. A resume also checks the files against the manifest and falls back past a damaged checkpoint.
A checkpoint saved by another number of ranks is converted once to DeepSpeed's universal format
(`<tag>_universal/`) before it is loaded, when it holds ZeRO partitions; one of a stage-0 engine holds the
optimizer state whole and loads as saved.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prelora_ds.checkpoint import manifest
from prelora_ds.distributed import collectives
from prelora_ds.errors import CheckpointWriteError
from prelora_ds.testing import faults

STATE_FILE = "trainer_state.json"
COMPLETE_FILE = "COMPLETE"
DORMANT_FILE = "dormant_moments.pt"
UNIVERSAL_SUFFIX = "_universal"


def rng_state() -> dict[str, Any]:
    """Every RNG of this rank in types `torch.load(weights_only=True)` reads: numpy's key array as a tensor."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        # this rank's device only: get_rng_state_all() would create a CUDA context on every GPU of the node
        # in every rank (hundreds of MB each on GPU 0..n), and its list would not fit another node layout
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]  # checkpoints before the tensor form hold numpy's own tuple
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        torch.cuda.set_rng_state(cuda[torch.cuda.current_device()] if isinstance(cuda, list) else cuda)


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
    dormant: dict | None = None,
    resumed: str | None = None,
) -> Path:
    """Save on every rank (collective). Returns the tag directory. `resumed`: the first save after a resume passes
    the tag it resumed (`prune`)."""
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    if rank == 0 and tag_dir.exists():  # left by an interrupted save (or an abandoned timeline): never mix files
        shutil.rmtree(tag_dir)
    collectives.barrier()
    try:
        with _recording_writes(engine) as written:
            engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step}, save_latest=False)
        mine = [tag_dir / f"rank{rank}.pt"]
        torch.save({**rank_state, "rng": rng_state()}, mine[0])
        if rank == 0:
            if frozen_fp32:
                mine.append(tag_dir / "frozen_fp32.pt")
                torch.save(frozen_fp32, mine[-1])
            if dormant:
                mine.append(tag_dir / DORMANT_FILE)
                torch.save(dormant, mine[-1])
            mine.append(tag_dir / STATE_FILE)
            _atomic_write(mine[-1], json.dumps(trainer_state, indent=1))
        # each rank reads back what it wrote (from its page cache), so the checksums spread over ranks and nodes
        entries = manifest.describe(tag_dir, [*(p for p in written if tag_dir in p.parents), *mine], rank)
    except (OSError, RuntimeError) as exc:
        error = write_error(exc, tag_dir, rank)
        if error is None:
            raise
        raise error from exc
    faults.in_save(step, rank)
    # every rank's files are on disk and checksummed before the checkpoint is declared complete
    gathered = collectives.all_gather_object(entries)
    if rank == 0:
        try:
            _atomic_write(tag_dir / manifest.MANIFEST_FILE, manifest.to_json(manifest.complete(tag_dir, gathered)))
        except OSError as exc:
            raise write_error(exc, tag_dir, rank) from exc
        _atomic_write(tag_dir / COMPLETE_FILE, tag)
        _atomic_write(ckpt_dir / "latest", tag)
        prune(ckpt_dir, keep, current=tag, resumed=resumed)
    collectives.barrier()
    return tag_dir


@contextlib.contextmanager
def _recording_writes(engine):
    """The paths DeepSpeed's checkpoint engine writes on this rank inside the block (the module file on rank 0, this
    rank's ZeRO partition, ...), so that each rank checksums its own files. Files written any other way (DeepSpeed's
    recovery scripts) are not recorded: rank 0 checksums what no rank claimed (`manifest.complete`)."""
    written: list[Path] = []
    writer = getattr(engine, "checkpoint_engine", None)
    if writer is None:
        yield written
        return
    save_file = writer.save

    def recording_save(state_dict, path):
        save_file(state_dict, path)
        written.append(Path(path))

    writer.save = recording_save
    try:
        yield written
    finally:
        writer.save = save_file


def write_error(exc: BaseException, tag_dir: Path, rank: int) -> CheckpointWriteError | None:
    """The user's message for an error while writing checkpoint `tag_dir`, or None when it is not about the
    files: a collective that timed out inside DeepSpeed's save (a rank stopped answering) keeps its own error.
    torch.save reports a full disk as a RuntimeError, so RuntimeErrors other than timeouts count as writes."""
    if collectives.is_timeout(exc) or not isinstance(exc, (OSError, RuntimeError)):
        return None
    latest = complete_tags(tag_dir.parent)
    return CheckpointWriteError(
        f"rank {rank} could not write checkpoint {tag_dir}: {exc}. That checkpoint stays incomplete and is "
        f"never resumed; the last complete one is {latest[-1] if latest else 'none'}. Free disk space (or "
        "fix the directory's permissions), then run the same command with --resume."
    )


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Complete checkpoint tags, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.parent.name for p in ckpt_dir.glob(f"step*/{COMPLETE_FILE}") if p.parent.name[4:].isdigit())


def incomplete_tags(ckpt_dir: Path) -> list[str]:
    """Checkpoint folders without the COMPLETE marker (a save that was interrupted or failed), oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(
        p.name
        for p in ckpt_dir.glob("step*")
        if p.is_dir() and p.name[4:].isdigit() and not (p / COMPLETE_FILE).exists()
    )


def prune(ckpt_dir: Path, keep: int, current: str | None = None, resumed: str | None = None) -> None:
    """Keep the newest `keep` complete checkpoints up to `current` (the one just saved; None: the newest); drop older
    ones, incomplete leftovers older than them, and complete checkpoints newer than `current`: those belong to the
    timeline a resume left when it fell back past damaged checkpoints, and the run would replace them when it reached
    their steps again (counting them would let a damaged checkpoint push out the one just saved). `resumed`: at the
    first save after a resume, the checkpoint it resumed: those between it and `current` are of that timeline too
    (steps the run passed without saving them again).

    The kept ones are verified: a checkpoint is complete only once its manifest holds checksums computed by reading
    every file back after it was written (`save`), and a resume checks the files against it again."""
    tags = complete_tags(ckpt_dir)
    current = current or (tags[-1] if tags else None)
    since = resumed or current  # this run's timeline has no checkpoint after it but the one just saved
    left = [t for t in tags if current is not None and t > since and t != current]  # the timeline a resume left
    timeline = [t for t in tags if t not in left]
    kept = timeline[-keep:]
    for tag in timeline[:-keep] + left + [t for t in incomplete_tags(ckpt_dir) if kept and t < kept[-1]]:
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
    for universal in ckpt_dir.glob(f"*{UNIVERSAL_SUFFIX}"):
        if universal.name.removesuffix(UNIVERSAL_SUFFIX) not in kept:
            shutil.rmtree(universal, ignore_errors=True)


@dataclass
class ResumeChoice:
    """Where a resume continues, and what it says about the checkpoints it passed over."""

    tag: str | None  # None: start from step 0 (or stop: `error`)
    message: str  # info: the checkpoint resumed (and any interrupted save skipped)
    warnings: list[str] = field(default_factory=list)  # one per damaged checkpoint, newest first
    notes: list[str] = field(default_factory=list)  # info: the checkpoint has no manifest, so it is not verified
    error: str | None = None  # every complete checkpoint is damaged: nothing to resume, and step 0 is no answer


Verifier = Callable[[str], list[str] | None]  # tag -> what is damaged ([]: it verifies; None: it has no manifest)


def find_resume(ckpt_dir: Path, verify: Verifier | None = None) -> ResumeChoice:
    """The checkpoint `latest` names if complete, else the newest complete one; one that `verify` finds damaged is
    passed over for the previous complete one (and so on). `verify`: checks a tag, by default against its manifest
    in this process (`manager.Checkpointer` spreads the work over the ranks)."""
    verify = verify or (lambda tag: manifest.verify(ckpt_dir / tag))
    tags = complete_tags(ckpt_dir)
    latest_file = ckpt_dir / "latest"
    latest = latest_file.read_text().strip() if latest_file.is_file() else None
    candidates = [latest, *(t for t in reversed(tags) if t < latest)] if latest in tags else tags[::-1]
    choice = ResumeChoice(None, f"no checkpoint to resume in {ckpt_dir}; starting from step 0")
    damaged: dict[str, list[str]] = {}
    for tag in candidates:
        problems = verify(tag)
        if problems:
            damaged[tag] = problems
            continue
        choice.tag = tag
        if problems is None:
            choice.notes.append(
                f"checkpoint {ckpt_dir / tag} has no {manifest.MANIFEST_FILE} (saved before checkpoints had one), so "
                "it cannot be verified; resuming it unchecked."
            )
        break
    instead = f"; resuming {choice.tag} instead (the next save removes the damaged one)" if choice.tag else ""
    choice.warnings = [f"checkpoint {ckpt_dir / t} is damaged: {'; '.join(p)}{instead}" for t, p in damaged.items()]
    if choice.tag is not None:
        what = "the newest complete checkpoint" + (" that verifies" if damaged else "")
        if choice.tag == latest:
            choice.message = f"resuming from {ckpt_dir / choice.tag}"
        elif latest in tags:
            choice.message = f"resuming from {what} {ckpt_dir / choice.tag}"
        else:
            why = f"'latest' names {latest!r}, which is incomplete or missing" if latest else "no 'latest' file"
            choice.message = f"{why}; resuming from {what} {ckpt_dir / choice.tag}"
    elif damaged:
        choice.error = (
            f"no checkpoint in {ckpt_dir} can be resumed: every complete one is damaged ("
            + "; ".join(f"{tag}: {', '.join(problems)}" for tag, problems in damaged.items())
            + "). Nothing was loaded. Restore them from a copy, or move the damaged folders out of the way (with no "
            "checkpoint left, --resume starts from step 0), then run the same command again."
        )
    skipped = [t for t in incomplete_tags(ckpt_dir) if choice.tag is None or t > choice.tag]
    if skipped:
        choice.message = (
            f"skipping incomplete checkpoint(s) {', '.join(skipped)} (a save was interrupted: no {COMPLETE_FILE} "
            f"marker); {choice.message}"
        )
    return choice


def read_trainer_state(tag_dir: Path) -> dict[str, Any]:
    return json.loads((tag_dir / STATE_FILE).read_text())


# what numpy's RNG tuple in a rank file written before the tensor form needs to unpickle (arrays of uint32)
_NUMPY_CORE = np._core if hasattr(np, "_core") else np.core  # numpy 2 renamed it (and pickles name the new one)
_LEGACY_NUMPY_GLOBALS = [_NUMPY_CORE.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType]


def read_rank_state(tag_dir: Path, rank: int) -> dict[str, Any] | None:
    """`rank<R>.pt` with weights_only=True: tensors and plain types only, so a crafted file cannot run code
    (DeepSpeed's own files still load with pickle: docs/reliability.md, trust)."""
    path = tag_dir / f"rank{rank}.pt"
    if not path.is_file():
        return None
    with torch.serialization.safe_globals(_LEGACY_NUMPY_GLOBALS):
        return torch.load(path, weights_only=True)


def read_frozen_fp32(tag_dir: Path) -> dict[str, torch.Tensor]:
    path = tag_dir / "frozen_fp32.pt"
    return torch.load(path, weights_only=True) if path.is_file() else {}


def read_dormant(tag_dir: Path) -> dict:
    path = tag_dir / DORMANT_FILE
    return torch.load(path, weights_only=True) if path.is_file() else {}


def holds_partitions(tag_dir: Path) -> bool:
    """Whether DeepSpeed saved the optimizer state as per-rank partitions (`*_optim_states.pt`: ZeRO 1-3), which
    another world size loads through the universal conversion. At stage 0 the optimizer (fp32: the torch optimizer;
    bf16: DeepSpeed's FP16_UnfusedOptimizer) is whole on every rank and DeepSpeed keeps its state in the model-states
    file: the same on any world size, and nothing the conversion could read (it looks for those partitions)."""
    return any(tag_dir.glob("*_optim_states.pt"))


def to_universal(ckpt_dir: Path, tag: str) -> Path:
    """Convert checkpoint `tag` to DeepSpeed's universal format (once; rank 0 only), for a new world size.

    The conversion has no manifest: it is derived data, made from `tag` after the resume verified `tag`, and loaded
    right away. A conversion kept from an earlier resume is reused unchecked; deleting `<tag>_universal/` makes the
    next resume convert again."""
    out = ckpt_dir / f"{tag}{UNIVERSAL_SUFFIX}"
    if (out / COMPLETE_FILE).exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
        "--input_folder", str(ckpt_dir / tag), "--output_folder", str(out),
        "--inject_missing_state",  # prelora_ds models carry no Megatron-style universal metadata; none is needed
        "--num_extract_workers", "2", "--num_merge_workers", "1",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"converting {ckpt_dir / tag} to a universal checkpoint failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}"
        )
    _atomic_write(out / COMPLETE_FILE, tag)
    return out


# Structure-defining recipe values: a checkpoint only loads into a model built with the same ones.
LAYOUT_KEYS = (
    ("model", "name"),
    ("model", "kwargs"),
    ("model", "qkv"),
    ("prelora", "target_modules"),
    ("prelora", "trainable_extra"),
)


def layout_mismatch(saved: dict[str, Any], cfg, num_classes: int, ds_config: dict[str, Any],
                    configs: dict[str, dict] | None = None) -> list[str]:
    """What differs between a checkpoint's saved trainer state and this run, in words (empty: it fits).
    `configs`: this run's DeepSpeed config of each phase (`config.deepspeed.phase_configs`)."""
    problems = []
    phase = saved.get("loop", {}).get("phase")
    written = saved.get("engine_settings")
    if written and configs and phase in configs:
        from prelora_ds.config.deepspeed import engine_record

        now = engine_record(configs[phase], False)
        where = "the DeepSpeed config" if phase == "full" else f"engine.{phase}"
        for key in ("zero_stage", "offload_optimizer"):  # the optimizer's partitions load into the same layout only
            if written[key] != now[key]:
                problems.append(f"the {phase} engine's {key} was {written[key]!r}, now {now[key]!r} (set it back in "
                                f"{where}: a checkpoint loads into an engine of the ZeRO stage and offload it was "
                                "saved with; the micro batch and activation checkpointing may change)")
    now = cfg.to_dict()
    for section, key in LAYOUT_KEYS:
        old = saved.get("config", {}).get(section, {}).get(key)
        if old is not None and old != now[section][key]:
            problems.append(f"{section}.{key} was {old!r}, now {now[section][key]!r}")
    if saved.get("num_classes") not in (None, num_classes):
        problems.append(f"the data had {saved['num_classes']} classes, now {num_classes}")
    old_rank = saved.get("config", {}).get("relora", {}).get("rank")
    if phase == "relora" and old_rank not in (None, cfg.relora.rank):
        problems.append(f"relora.rank was {old_rank}, now {cfg.relora.rank} (the checkpoint is in phase relora)")
    old_batch = saved.get("train_batch_size")
    if old_batch not in (None, ds_config["train_batch_size"]):
        problems.append(
            f"the global batch (train_batch_size) was {old_batch}, now {ds_config['train_batch_size']}: set "
            f'"train_batch_size": {old_batch} in the DeepSpeed config and DeepSpeed derives the accumulation for '
            "this world size"
        )
    return problems


def mismatch_message(tag_dir: Path, problems: list[str]) -> str:
    return (
        f"checkpoint {tag_dir} does not fit this run: {'; '.join(problems)}. Resume with the values it was saved "
        "with, or pass another --output_dir to start a new run."
    )


def estimate_bytes(total_params: int, dtype_bytes: int) -> int:
    """Upper estimate of one checkpoint: the module in its dtype, fp32 masters + two Adam moments (12 bytes a
    parameter, all trainable in `full`), and 25% for LoRA factors of the warmup phase and file overhead."""
    return int(total_params * (dtype_bytes + 12) * 1.25)


def nearest_existing(path: Path) -> Path:
    """`path`, or its nearest existing parent: where a run directory that does not exist yet will be made."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_free_space(out_dir: Path, need: int, keep: int) -> str | None:
    """OSError when not even one checkpoint of `need` bytes fits; a warning text when `keep` + 1 do not
    (the new one is written before the oldest is pruned); else None."""
    free = shutil.disk_usage(nearest_existing(out_dir)).free
    gib = 2**30
    if free < need:
        raise OSError(
            f"output_dir {out_dir} has {free / gib:.2f} GiB free, but one checkpoint of this model needs about "
            f"{need / gib:.2f} GiB; free space or pass an --output_dir on a larger disk."
        )
    if free < need * (keep + 1):
        return (
            f"output_dir {out_dir} has {free / gib:.2f} GiB free; train.keep_checkpoints={keep} needs "
            f"about {need * (keep + 1) / gib:.2f} GiB (the new checkpoint is written before the oldest is pruned). "
            "A save that runs out of space stops the run and keeps the last complete checkpoint."
        )
    return None
