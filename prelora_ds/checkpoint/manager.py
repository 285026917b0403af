"""The run's checkpoints: one save per optimizer step, and a resume that finds the newest complete checkpoint
and fits it to this run (another world size through DeepSpeed's universal format, another micro batch).

The file layout and the crash-safe `latest` are in `storage.py`; this module holds the decisions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prelora_ds.checkpoint import manifest, storage
from prelora_ds.distributed import collectives
from prelora_ds.errors import TrainingError
from prelora_ds.log import RANK_ZERO, logger
from prelora_ds.training.loop_state import BatchGeometry


@dataclass
class Resumed:
    """What a resume found: the loop state to continue from and how to load the engine."""

    tag: str
    loop: dict[str, Any]  # LoopState fields, the position in the epoch already mapped to this run
    load_tag: str  # `tag`, or its universal conversion for another world size
    checkpoint: dict | None  # the DeepSpeed config's "checkpoint" section for loading (load_universal when converted)
    saved_world: int
    engine: dict[str, Any]  # the engine layout to rebuild (PhaseEngine.state_dict)


class Checkpointer:
    """Saves and finds the checkpoints of `ckpt_dir` for this rank (every method is collective)."""

    def __init__(self, ckpt_dir: Path, rank: int, keep: int, ds_config: dict, geometry: BatchGeometry):
        """`geometry`: the trainer's batch geometry (read, not copied: the trainer owns it)."""
        self.dir, self.rank, self.keep, self.ds_config, self.geometry = ckpt_dir, rank, keep, ds_config, geometry
        self.saved_step: int | None = None  # the step of the newest checkpoint this run has (saved or resumed)
        self.resumed_tag: str | None = None  # until this run's first save: the checkpoint it resumed

    def last_complete(self) -> str:
        """The newest complete checkpoint of this run's timeline (not one past the step it resumed or saved: after a
        resume fell back past a damaged checkpoint, that one waits to be removed by the next save)."""
        done = storage.complete_tags(self.dir)
        if self.saved_step is not None:
            done = [t for t in done if t <= storage.tag_for(self.saved_step)]
        return str(self.dir / done[-1]) if done else "none"

    def save(
        self, engine, step: int, trainer_state: dict[str, Any], rank_state: dict[str, Any], frozen: dict | None,
        dormant: dict | None = None,
    ) -> bool:
        """Checkpoint step `step` unless this run already has it (a save deletes an existing tag of the same
        step first, so a second save would leave a window with no checkpoint of that step). Returns whether
        it saved."""
        if self.saved_step == step:
            return False
        storage.save(engine, self.dir, step, trainer_state, rank_state, frozen if self.rank == 0 else None,
                     self.rank, self.keep, dormant if self.rank == 0 else None, self.resumed_tag)
        self.saved_step, self.resumed_tag = step, None
        return True

    # ----------------------------------------------------------------- resume
    def find(self, cfg, num_classes: int) -> Resumed | None:
        """The checkpoint to continue from (None: start from step 0), verified against its manifest before anything
        is loaded, and checked against this run."""
        t0 = time.perf_counter()
        choice = storage.find_resume(self.dir, self._verify)
        for warning in choice.warnings:
            logger.warning(warning, extra=RANK_ZERO)  # every rank has the same list: say it once
        if choice.error:
            # after the process group started, like every resume failure: exit 1. Not 75 (requeue): a restart
            # meets the same files; nor step 0, which would silently throw the run away
            raise TrainingError(choice.error)
        logger.info(choice.message)
        for note in choice.notes:
            logger.info(note)
        if choice.tag is None:
            return None
        tag = choice.tag
        tag_dir = self.dir / tag
        if not choice.notes:
            entries = manifest.read(tag_dir) or []
            logger.info(f"verified {tag} against its {manifest.MANIFEST_FILE}: {len(entries)} files, "
                        f"{sum(e['size'] for e in entries) / 1e6:.1f} MB, {time.perf_counter() - t0:.2f} s")
        saved = storage.read_trainer_state(tag_dir)
        problems = storage.layout_mismatch(saved, cfg, num_classes, self.ds_config)
        if problems:
            raise TrainingError(storage.mismatch_message(tag_dir, problems))
        loop = dict(saved["loop"])
        loop["batch_in_epoch"] = self._map_epoch_position(saved, tag, loop)
        saved_world = saved.get("world_size", self.geometry.world)
        checkpoint, load_tag = None, tag
        if saved_world != self.geometry.world:
            if storage.holds_partitions(tag_dir):
                load_tag = self._to_universal(saved, tag, loop)
                checkpoint = {**self.ds_config.get("checkpoint", {}), "load_universal": True}
            else:
                self._world_changed(saved, tag, loop, "no ZeRO partitions (stage 0): loaded as saved")
        self.saved_step, self.resumed_tag = loop["step"], tag
        return Resumed(tag, loop, load_tag, checkpoint, saved_world, saved.get("engine", {}))

    def _verify(self, tag: str) -> list[str] | None:
        """What is damaged in checkpoint `tag` ([]: nothing; None: it has no manifest), the same answer on every rank.
        Each rank checks every size and checksums its share of the files (`manifest.share`: the reading of a large
        checkpoint spreads over the ranks and nodes of a shared filesystem instead of rank 0 reading it all while the
        others wait); the problems are all-gathered, so each rank decides from the same list and every rank takes
        the same checkpoint (one collective per checkpoint tried)."""
        answers = collectives.all_gather_object(manifest.verify(self.dir / tag, self.rank, self.geometry.world))
        problems = sorted({p for answer in answers if answer for p in answer})
        return problems if problems or all(answer is not None for answer in answers) else None

    def load(self, engine, resumed: Resumed) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """Load the engine's state; returns (the kept fp32 base, this rank's pending loss sums or None) and
        restores this rank's RNG. On another world size rank 0 takes every saved rank's loss sums."""
        tag_dir = self.dir / resumed.tag
        load_path, _ = engine.load_checkpoint(str(self.dir), tag=resumed.load_tag)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {self.dir / resumed.load_tag}")
        frozen = storage.read_frozen_fp32(tag_dir)
        pending = None
        if resumed.saved_world == self.geometry.world:
            rank_state = storage.read_rank_state(tag_dir, self.rank)
            if rank_state is not None:
                pending = torch.tensor(rank_state["pending_loss"], dtype=torch.float64)
                storage.set_rng_state(rank_state["rng"])
        else:
            states = [storage.read_rank_state(tag_dir, r) for r in range(resumed.saved_world)]
            if self.rank == 0:
                pending = torch.tensor([sum(s["pending_loss"][i] for s in states if s) for i in range(2)],
                                       dtype=torch.float64)
            if self.rank < resumed.saved_world and states[self.rank] is not None:
                storage.set_rng_state(states[self.rank]["rng"])
        return frozen, pending

    def _map_epoch_position(self, saved: dict[str, Any], tag: str, loop: dict[str, Any]) -> int:
        """The position in the epoch is kept in micro batches per rank; with another micro batch or world size
        it is re-expressed from the images consumed (same global batch, so always a whole number of steps)."""
        g = self.geometry
        old_micro, old_world = saved.get("micro_batch", g.micro), saved.get("world_size", g.world)
        if (old_micro, old_world) == (g.micro, g.world):
            return loop["batch_in_epoch"]
        images = loop["batch_in_epoch"] * old_micro * old_world
        if images % (g.micro * g.world):
            raise TrainingError(
                f"checkpoint {tag} stopped after {images} images of epoch {loop['epoch']}, not a whole number of "
                f"micro batches of {g.micro} on {g.world} rank(s); keep train_batch_size the same."
            )
        return images // (g.micro * g.world)

    def _to_universal(self, saved: dict[str, Any], tag: str, loop: dict[str, Any]) -> str:
        """Convert a checkpoint of another world size to DeepSpeed's universal format (rank 0, once)."""
        t0 = time.perf_counter()
        if self.rank == 0:
            storage.to_universal(self.dir, tag)
        collectives.barrier()
        self._world_changed(saved, tag, loop, f"converted to a DeepSpeed universal checkpoint "
                            f"({self.dir / (tag + storage.UNIVERSAL_SUFFIX)}, {time.perf_counter() - t0:.1f} s)")
        return tag + storage.UNIVERSAL_SUFFIX

    def _world_changed(self, saved: dict[str, Any], tag: str, loop: dict[str, Any], how: str) -> None:
        """Say how a checkpoint of another world size is loaded and where the epoch continues."""
        g = self.geometry
        images = loop["batch_in_epoch"] * g.micro * g.world
        logger.info(
            f"resuming {tag}, saved by {saved['world_size']} rank(s), on {g.world} rank(s): {how}; global batch "
            f"{self.ds_config['train_batch_size']} = {g.micro} micro x {g.accum} accumulation x {g.world} rank(s); "
            f"continuing at image {images} of epoch {loop['epoch']}"
        )
        if saved.get("steps_per_epoch", g.steps_per_epoch) != g.steps_per_epoch:
            logger.warning(
                f"an epoch is now {g.steps_per_epoch} steps (it was {saved['steps_per_epoch']}): the sampler's "
                "padding differs by world size; the LR schedule follows the new count.",
                extra=RANK_ZERO,
            )
