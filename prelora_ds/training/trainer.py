"""The one training loop: every phase runs through `Trainer.train_step`; phase changes are data.

After each optimizer step (and again at the end of an epoch, after validation): norm sample and window
close -> switch decision (`policy.switch_decision`) -> ReLoRA start / merge -> end of warmup. Then the stop
agreement, then at most one checkpoint for the step (a phase change, `checkpoint_every_steps` or an epoch
end asks for it). The engine and its rebuilds are `PhaseEngine`'s, checkpoints `Checkpointer`'s, what the
run shows `Recorder`'s. Design: docs/design.md.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from prelora_ds.algorithm import policy
from prelora_ds.algorithm.policy import Clock
from prelora_ds.checkpoint import storage
from prelora_ds.checkpoint.manager import Checkpointer
from prelora_ds.config.deepspeed import engine_record, phase_configs
from prelora_ds.config.sections import RunConfig
from prelora_ds.data.datasets import DataBundle, build_loaders, build_mixup, build_train_loss
from prelora_ds.distributed import collectives, preempt
from prelora_ds.engine.phase_engine import PhaseEngine
from prelora_ds.errors import CheckpointWriteError, NonFiniteError, TrainingError
from prelora_ds.log import RANK_ZERO, logger
from prelora_ds.lora.merge import lora_scales, save_merged
from prelora_ds.metrics.recorder import Recorder, summary, tag
from prelora_ds.testing import faults
from prelora_ds.training.controller import PhaseController
from prelora_ds.training.loop_state import BatchGeometry, LoopState
from prelora_ds.training.validation import count_val_set

__all__ = ["LoopState", "Trainer"]
MAX_STEP_TIMES = 5000  # per phase, for the median in summary.json


class Trainer:
    def __init__(self, cfg: RunConfig, ds_config: dict, data: DataBundle, out_dir: Path, rank: int, world: int,
                 resume: bool, first_phase: str = "full", start_ranks: dict[str, int] | None = None,
                 stop_request: preempt.StopRequest | None = None) -> None:  # fmt: skip
        """`first_phase`/`start_ranks` build a phase's structure directly (benchmarks); runs start in `full`.
        `stop_request`: the process's installed signal handlers (pre-emption); one that never fires by default."""
        self.cfg, self.ds_config, self.data, self.out_dir = cfg, ds_config, data, out_dir
        self.rank, self.world = rank, world
        micro, accum = ds_config["train_micro_batch_size_per_gpu"], ds_config["gradient_accumulation_steps"]
        self.train_loader, self.val_loader = build_loaders(data, micro, rank, world, cfg.train.seed,
                                                           cfg.data.num_workers)
        if len(self.train_loader) < accum:
            raise TrainingError(f"an epoch has {len(self.train_loader)} micro batches per rank, fewer than "
                                f"gradient_accumulation_steps={accum}; lower the batch size or accumulation.")
        self.geometry = BatchGeometry(micro, accum, world, len(self.train_loader) // accum)
        spe, t = self.geometry.steps_per_epoch, cfg.train
        self.total_steps = min(t.epochs * spe, t.max_steps or t.epochs * spe)
        lr_warmup = t.lr_warmup_steps if t.lr_warmup_steps is not None else round(t.lr_warmup_epochs * spe)
        self.mixup = build_mixup(cfg.data, data.num_classes)
        self.train_loss = build_train_loss(cfg.data, self.mixup is not None)
        self.eval_loss = torch.nn.CrossEntropyLoss()
        p = cfg.prelora
        warmup_phase = p.warmup_steps if p.warmup_steps is not None else p.warmup_epochs * spe
        self.phases = PhaseEngine(cfg, ds_config, data.num_classes, self.total_steps, lr_warmup,
                                  phase_configs(ds_config, cfg.engine, world), warmup_phase)
        self.ckpt = Checkpointer(out_dir / "checkpoints", rank, t.keep_checkpoints, ds_config, self.geometry)
        self.recorder = Recorder(out_dir, rank)
        # names the operation in the error when a rank stops answering inside it (the controller's too)
        self.collective = collectives.NamedCollectives(rank, t.collective_timeout_s, self.ckpt.last_complete)
        self.control = PhaseController(cfg, self.phases, self.recorder, rank, world, self.collective)
        self.state = LoopState()
        self.save_due = False  # a phase changed or an epoch ended: this step wants a checkpoint
        self.last_lr = 0.0
        self.stop_request = stop_request or preempt.StopRequest()
        self.preempted: preempt.StopDecision | None = None  # set when a signal stopped the run
        if resume:
            self._resume()
        else:
            self.state.start_phase(first_phase, start_ranks, 0)
            self.phases.build(first_phase, start_ranks, 0)

    @property
    def engine(self):
        return self.phases.engine

    # ----------------------------------------------------------------- the loop
    def train(self) -> dict[str, Any] | None:
        """Run to the end (returns the summary) or stop early (pre-empted, train.stop_at_step: returns None).

        Raises TrainingError (message for the user) for a collective timeout, a checkpoint that could not be
        written, non-finite norms or losses in the convergence test, or too many skipped steps in a row."""
        try:
            return self._run()
        except (RuntimeError, ValueError) as exc:
            self.recorder.close()  # keep what TensorBoard has of the steps before the failure
            if isinstance(exc, TrainingError):
                raise
            if isinstance(exc, CheckpointWriteError):
                raise TrainingError(str(exc)) from exc
            if isinstance(exc, NonFiniteError):
                raise TrainingError(
                    f"rank {self.rank}, step {self.state.step}: {exc} The last complete checkpoint is "
                    f"{self.ckpt.last_complete()}; lower the learning rate or check the data, then run the same "
                    "command with --resume."
                ) from exc
            if collectives.is_timeout(exc) or collectives.peer_lost(exc):  # outside the named operations
                raise self.collective.error("a collective", exc) from exc
            raise

    def _run(self) -> dict[str, Any] | None:
        if self.rank == 0:
            (self.out_dir / preempt.MARKER).unlink(missing_ok=True)  # this run continues it
        self.recorder.start(self.total_steps, self.state.step, self.phases.layout.modules, self.state.phase)
        if self.phases.built_elements is not None:
            held, whole = self.phases.built_elements
            logger.info(f"ZeRO-3: model built partitioned (deepspeed.zero.Init): rank {self.rank} allocated "
                        f"{held:,} of {whole:,} parameter elements")
        if not self.state.current.trainable_params:
            self.control.record_params(self.state)
        t_start = time.perf_counter() - self.state.wall_s
        self.engine.train()
        while self.state.step < self.total_steps:
            t_last = time.perf_counter()
            for group in self._epoch_batches():
                loss = self.train_step(group)
                if faults.active():
                    faults.after_step(self.state.step, self.rank, self.engine.module)
                self._log_step(loss, time.perf_counter() - t_last)
                self.save_due |= self.control.after_step(self.state, Clock(self.state.step, self.state.epoch))
                if self._epoch_done():
                    self._end_epoch()
                regrouped = self._regroup()  # a new loader: the while loop takes the epoch up from here
                self.state.wall_s = time.perf_counter() - t_start
                with self.collective(f"the all-reduce of the stop request after step {self.state.step}"):
                    decision = self.stop_request.agreed()  # every rank stops after the same step
                if decision.stop or self._stop_at_step():
                    return self._stop(decision)
                every = self.cfg.train.checkpoint_every_steps
                due = self.save_due or (every and self.state.step % every == 0)
                if self.state.step < self.total_steps and due:
                    self.save_checkpoint()
                if self.state.step >= self.total_steps or regrouped:
                    break
                t_last = time.perf_counter()
            else:
                if self._epoch_done():  # saved before its epoch end
                    self._end_epoch()
        if not self.state.val or self.state.val[-1]["step"] != self.state.step:
            self.validate()
        self.state.wall_s = time.perf_counter() - t_start
        self.state.current.end_step, self.state.current.peak_memory_bytes = self.state.step, self.recorder.peak_memory()
        self.save_checkpoint()
        result = self.finish()
        self.recorder.close()
        return result

    def _epoch_batches(self):
        """Micro batches of the current epoch from the resume position, grouped per optimizer step."""
        self.train_loader.sampler.set_epoch(self.state.epoch)
        self.train_loader.dataset.set_epoch(self.state.epoch)
        self.train_loader.sampler.skip(self.state.batch_in_epoch * self.geometry.micro)
        group = []
        for batch in self.train_loader:
            group.append(batch)
            if len(group) == self.geometry.accum:
                yield group
                group = []

    def _end_epoch(self) -> None:
        """Validation, then the epoch-based decisions; the epoch's checkpoint follows the step's stop check."""
        if (self.state.epoch + 1) % self.cfg.train.eval_every_epochs == 0:
            self.validate()
        self.control.after_step(self.state, Clock(self.state.step, self.state.epoch, epoch_end=True))
        self.state.epoch += 1
        self.state.batch_in_epoch = 0
        self.save_due = True  # every epoch end has a checkpoint (after the step's stop agreement)

    def _regroup(self) -> bool:
        """After a rebuild into a phase with another micro batch: a train loader of that micro batch, continuing at
        the same image of the epoch (the sampler's order does not depend on the batch size, so the data order and
        the images of every step stay the same; only their grouping into forward passes changes). Returns whether
        the loader was replaced."""
        micro = self.phases.configs[self.state.phase]["train_micro_batch_size_per_gpu"]
        if micro == self.geometry.micro:
            return False
        old = f"{self.geometry.micro} x {self.geometry.accum}"
        self.state.batch_in_epoch = self.geometry.regroup(micro, self.state.batch_in_epoch)
        self.train_loader, _ = build_loaders(self.data, micro, self.rank, self.world, self.cfg.train.seed,
                                             self.cfg.data.num_workers)
        logger.info(f"[{self.state.phase}] step {self.state.step}: micro batch x accumulation {old} -> {micro} x "
                    f"{self.geometry.accum} (the global batch stays {self.geometry.global_batch})")
        return True

    def _epoch_done(self) -> bool:
        return self.state.batch_in_epoch >= self.geometry.steps_per_epoch * self.geometry.accum

    def _stop_at_step(self) -> bool:
        stop = self.cfg.train.stop_at_step
        return stop is not None and self.state.step == stop and self.state.step < self.total_steps

    # ----------------------------------------------------------------- steps
    def train_step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """One optimizer step over the micro batches; advances the step. Returns this rank's mean loss as a
        0-dim tensor on the device: losses stay there (no host sync per micro batch) until logged or sampled."""
        engine, dtype, step = self.engine, self.phases.dtype, self.state.step + 1
        factor = policy.lr_factor(self.state.phase, self.state.step, self.state.relora_start(), self.cfg.prelora,
                                  self.cfg.relora)
        self.last_lr = self.phases.set_lr(self.state.step, factor)
        total = torch.zeros((), dtype=torch.float64, device=engine.device)
        with self.collective(f"forward/backward/optimizer step {step} (ZeRO gradient reduce and all-gather)"):
            for images, targets in micro_batches:  # pinned on GPU (build_loaders): the copies overlap compute
                images = images.to(engine.device, non_blocking=True)
                targets = targets.to(engine.device, non_blocking=True)
                if self.mixup is not None:
                    images, targets = self.mixup(images, targets)
                loss = self.train_loss(engine(images.to(dtype)).float(), targets)
                if faults.active():
                    loss = loss * faults.loss_factor(step, self.rank)
                engine.backward(loss)
                engine.step()
                value = loss.detach().double()
                total += value
                # a skipped step must not poison the convergence test's loss windows
                self.control.add_loss(value, images.shape[0])
        self.state.step, self.state.batch_in_epoch = step, self.state.batch_in_epoch + len(micro_batches)
        self._count_bad_step(step)
        return total / len(micro_batches)

    def _count_bad_step(self, step: int) -> None:
        """DeepSpeed skips a step whose gradient is non-finite (all ranks agree: its overflow flag and the
        global norm are all-reduced). Count it; stop after train.max_bad_steps in a row."""
        if self.engine.was_step_applied():
            self.state.bad_streak = 0
            return
        self.state.skipped_steps += 1
        self.state.bad_streak += 1
        limit = self.cfg.train.max_bad_steps
        self.recorder.skipped(step, self.state.skipped_steps, self.state.bad_streak, limit)
        if self.state.bad_streak >= limit:
            raise TrainingError(
                f"steps {step - self.state.bad_streak + 1}-{step}: {self.state.bad_streak} consecutive steps with a "
                f"non-finite loss or gradient (train.max_bad_steps={limit}); stopping without saving. The last good "
                f"checkpoint is {self.ckpt.last_complete()}. Lower the learning rate or check the data, then run the "
                "same command with --resume."
            )

    def _log_step(self, loss: torch.Tensor, dt: float) -> None:
        step, times = self.state.step, self.state.step_times.setdefault(self.state.phase, [])
        times.append(dt)
        del times[:-MAX_STEP_TIMES]
        if step % self.cfg.train.log_every_steps and step != self.total_steps:
            self.recorder.progress(step)
            return
        with self.collective(f"the all-reduce of the logged loss at step {step}"):
            mean_loss = collectives.all_reduce_sum([float(loss)])[0] / self.world
        images = self.ds_config["train_batch_size"]
        self.recorder.train_step(step, self.state.phase, mean_loss, self.last_lr, dt, images,
                                 self.engine.get_global_grad_norm())

    def validate(self) -> dict[str, float]:
        """Exact top-1/top-5 over the whole val set (no padded duplicates), all-reduced."""
        counts = count_val_set(self.engine, self.val_loader, self.phases.dtype, self.eval_loss)
        with self.collective(f"the all-reduce of the validation counts at step {self.state.step}"):
            result = counts.reduce() | {"step": self.state.step, "epoch": self.state.epoch, "wall_s": self.state.wall_s}
        self.state.val.append(result)
        self.recorder.val(self.state.step, self.state.epoch, self.state.phase, result)
        return result

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The loop's state and the run's layout, as saved beside DeepSpeed's files (trainer_state.json)."""
        loop = self.state.to_dict() | {"windows": self.control.acc.state_dict()}
        phase = self.state.phase
        engine = engine_record(self.phases.configs[phase], self.cfg.engine.settings(phase)["activation_checkpointing"])
        return {"loop": loop, "config": self.cfg.to_dict(), "world_size": self.world,
                "model": self.cfg.model.name, "num_classes": self.data.num_classes,
                "train_batch_size": self.ds_config["train_batch_size"], "micro_batch": self.geometry.micro,
                "steps_per_epoch": self.geometry.steps_per_epoch, "engine": self.phases.state_dict(),
                "engine_settings": engine}  # fmt: skip

    def load_state_dict(self, loop: dict[str, Any]) -> None:
        self.state = LoopState.from_dict(loop)
        if loop.get("windows"):
            self.control.acc.load_state_dict(loop["windows"])

    def save_checkpoint(self) -> None:
        t0, step = time.perf_counter(), self.state.step
        with self.collective(f"the checkpoint save of step {step} (barriers between the ranks' writes)"):
            saved = self.ckpt.save(self.engine, step, self.state_dict(),
                                   {"pending_loss": self.control.pending_loss_sums()},
                                   self.phases.frozen_state(self.rank), self.phases.dormant)
        self.save_due = False
        if saved:
            self.recorder.scalars(step, {tag("save_s"): time.perf_counter() - t0})

    def _resume(self) -> None:
        t0 = time.perf_counter()
        with self.collective("the resume (the ranks verify the checkpoint; rank 0 converts one of another world size)"):
            resumed = self.ckpt.find(self.cfg, self.data.num_classes)
        if resumed is None:
            self.state.start_phase("full", None, 0)
            self.phases.build("full", None, 0)
            return
        self.load_state_dict(resumed.loop)
        self.phases.build(self.state.phase, self.state.ranks, self.state.step, resumed.checkpoint,
                          keep_frozen=False, saved=resumed.engine)
        with self.collective(f"loading checkpoint {self.ckpt.dir / resumed.tag}"):
            frozen, pending = self.ckpt.load(self.engine, resumed)
        self.phases.after_load(frozen, resumed.engine, storage.read_dormant(self.ckpt.dir / resumed.tag))
        if pending is not None:
            self.control.restore_pending_loss(pending)
        self._regroup()  # the position was mapped in the run's first micro batch; the phase may use another
        if self.state.step:
            logger.info(f"resumed at step {self.state.step} (epoch {self.state.epoch}, phase {self.state.phase}) in "
                        f"{time.perf_counter() - t0:.1f} s")

    def _stop(self, decision: preempt.StopDecision) -> None:
        """Checkpoint this step (unless it has one) and end the run early: pre-empted, or train.stop_at_step."""
        self.save_checkpoint()
        if decision.stop:
            self.preempted = decision
            where = self.ckpt.dir / storage.tag_for(self.state.step)
            self.recorder.preempted(decision, self.state.step, self.state.phase, where)
        else:
            logger.info(f"stopped at step {self.state.step} (train.stop_at_step); continue with --resume")
        self.recorder.close()

    # ----------------------------------------------------------------- outputs
    def finish(self) -> dict[str, Any]:
        """summary.json, window statistics and the merged fp32 model (rank 0 writes; the gather is collective)."""
        with self.collective("the gather of the fp32 model for the export"):
            state = self.phases.fp32_state()
            skipped = int(collectives.all_reduce_sum([float(self.data.num_skipped)])[0])
        result = summary(self.state, {
            "steps_per_epoch": self.geometry.steps_per_epoch, "world_size": self.world, "model": self.cfg.model.name,
            "num_classes": self.data.num_classes, "train_batch_size": self.ds_config["train_batch_size"],
            "skipped_images": skipped})  # fmt: skip
        if skipped:
            logger.warning(f"{skipped} unreadable images were skipped (see the log)", extra=RANK_ZERO)
        if self.rank == 0:
            save_merged(self.out_dir / "model_merged.safetensors", state, lora_scales(self.engine.module))
        self.recorder.write_json("summary.json", result)
        self.control.write_windows(self.state)
        return result

    def close(self) -> None:
        self.phases.destroy()

    def switch_to(self, name: str, ranks: dict[str, int] | None = None, merge_lora: bool = False) -> float:
        """Rebuild the engine for phase `name` now (benchmarks and checks); returns the seconds it took."""
        self.save_due = True
        return self.control.switch_to(self.state, name, ranks, merge_lora=merge_lora)
