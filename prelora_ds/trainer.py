"""The one training loop: every phase runs through `Trainer.train_step`; phase changes are data.

Order of events after each optimizer step: LR/log -> norm sample (and window close, test, switch
decision) -> checkpoint. At the end of each epoch: validation -> epoch-based samples/windows ->
checkpoint. A switch rebuilds the engine in-process (`switch.rebuild`) and checkpoints right away.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prelora_ds import checkpoint, dist, faults, norms, preempt, relora
from prelora_ds.config import RunConfig
from prelora_ds.convergence import WindowAccumulator, layer_changes, loss_change, module_changes, partial_convergence
from prelora_ds.data import DataBundle, build_loaders, build_mixup, build_train_loss
from prelora_ds.dsconfig import weight_decay
from prelora_ds.evaluate import TopKCounts
from prelora_ds.export import lora_scales, save_merged
from prelora_ds.export import merge_lora as merge_lora_state
from prelora_ds.model import count_params, create_model
from prelora_ds.monitor import Monitor, memory_bytes, reset_peak_memory
from prelora_ds.phases import PHASES, build_structure, canonical_name, target_layers
from prelora_ds.ranks import assign_ranks, ranks_by_module_name
from prelora_ds.schedule import build_scheduler, set_lr
from prelora_ds.switch import build_engine, gather_fp32_state, load_fp32_state, rebuild

MAX_STEP_TIMES = 5000  # per phase, for the median in summary.json
_TIMEOUT = re.compile(r"timed? ?out|timeout", re.IGNORECASE)


class TrainingError(RuntimeError):
    """A run that cannot go on; the message says why and what to do. The last complete checkpoint is kept."""


def is_timeout(exc: BaseException) -> bool:
    """A collective that gave up waiting (gloo/NCCL word it differently; both say 'time(d) out')."""
    return isinstance(exc, RuntimeError) and bool(_TIMEOUT.search(str(exc)))


@dataclass
class LoopState:
    """Everything the loop needs to continue exactly; saved in every checkpoint."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # micro batches of the current epoch already consumed
    phase: str = "full"
    ranks: dict[str, int] = field(default_factory=dict)
    switch_step: int | None = None
    switch_epoch: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    step_times: dict[str, list[float]] = field(default_factory=dict)
    windows: dict[str, Any] = field(default_factory=dict)
    checks: list[dict[str, Any]] = field(default_factory=list)
    val: list[dict[str, float]] = field(default_factory=list)
    wall_s: float = 0.0
    relora_merges: int = 0
    merge_s: list[float] = field(default_factory=list)
    skipped_steps: int = 0  # steps DeepSpeed skipped for a non-finite loss or gradient
    bad_streak: int = 0  # of them, how many in a row up to the current step


class Trainer:
    def __init__(
        self,
        cfg: RunConfig,
        ds_config: dict,
        data: DataBundle,
        out_dir: Path,
        rank: int,
        world: int,
        resume: bool,
        start_phase: str = "full",
        start_ranks: dict[str, int] | None = None,
        stop_request: preempt.StopRequest | None = None,
    ) -> None:
        """`start_phase`/`start_ranks` build a phase's structure directly (benchmarks); runs start in `full`.
        `stop_request`: the installed signal handlers of the process (pre-emption); one that never fires by default."""
        self.cfg, self.ds_config, self.data, self.out_dir = cfg, ds_config, data, out_dir
        self.rank, self.world = rank, world
        self.ckpt_dir = out_dir / "checkpoints"
        self.micro = ds_config["train_micro_batch_size_per_gpu"]
        self.accum = ds_config["gradient_accumulation_steps"]
        self.wd = weight_decay(ds_config)
        self.train_loader, self.val_loader = build_loaders(
            data, self.micro, rank, world, cfg.train.seed, cfg.data.num_workers
        )
        self.steps_per_epoch = len(self.train_loader) // self.accum
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"an epoch has {len(self.train_loader)} micro batches per rank, fewer than "
                f"gradient_accumulation_steps={self.accum}; lower the batch size or accumulation."
            )
        epochs_steps = cfg.train.epochs * self.steps_per_epoch
        self.total_steps = min(epochs_steps, cfg.train.max_steps or epochs_steps)
        self.mixup = build_mixup(cfg.data, data.num_classes)
        self.train_loss = build_train_loss(cfg.data, self.mixup is not None)
        self.eval_loss = torch.nn.CrossEntropyLoss()
        self.state = LoopState()
        self.frozen_fp32: dict[str, torch.Tensor] = {}
        self.pending_loss = _zero_loss()  # this rank's (sum of per-image losses, images) since the last sample
        self.acc = WindowAccumulator(cfg.prelora.window_value)
        self.engine = None
        self.layout: norms.NormLayout | None = None
        self.monitor: Monitor | None = None
        self._at_epoch_end = False
        self.stop_request = stop_request or preempt.StopRequest()
        self.preempted: preempt.StopDecision | None = None  # set when a signal stopped the run
        self.saved_step: int | None = None  # the step of the last checkpoint this process saved
        self.op = "start-up"  # what this rank is doing, named in a collective-timeout error
        if resume:
            self._resume()
        else:
            self._start_phase(start_phase, start_ranks)
            self.engine = self._fresh_engine()

    # ----------------------------------------------------------------- build
    def _make_model(self, state: dict[str, torch.Tensor] | None) -> torch.nn.Module:
        """A fresh timm model with the current phase's structure (and `state` loaded when given).

        With a `state`, every base weight is overwritten, so the model is allocated without timm's
        random init (meta device, then `to_empty`): seconds saved per switch on ViT-L.
        """
        phase = PHASES[self.state.phase]
        if state is None:
            model = create_model(self.cfg.model, self.data.num_classes)
        else:
            with torch.device("meta"):
                model = create_model(self.cfg.model, self.data.num_classes)
            if any(True for _ in model.buffers()):  # buffers are not in `state`: keep timm's values
                model = create_model(self.cfg.model, self.data.num_classes)
            else:
                model = model.to_empty(device="cpu")
        if self.layout is None:
            self.layout = norms.NormLayout.from_layers(target_layers(model, self.cfg.prelora.target_modules))
        model = build_structure(model, phase, self.state.ranks or None, self.cfg.prelora)
        if state is not None:
            missing = [k for k in load_fp32_state(model, state) if ".lora_" not in k]
            if missing:
                raise RuntimeError(f"the carried state has no value for {missing[:5]}")
        return model

    def _fresh_engine(self, keep_frozen: bool = True, ds_config: dict | None = None):
        """Engine on a freshly initialised model of the current phase (a new run, or before a resume
        loads its checkpoint). `keep_frozen`: keep the fp32 values of a frozen base (a run that starts
        in a phase with one) before DeepSpeed casts the module to bf16. `ds_config`: this engine only."""
        torch.manual_seed(self.cfg.train.seed)  # same initial weights on every rank and every run
        model = self._make_model(None)
        if keep_frozen:
            self.frozen_fp32 = {
                canonical_name(n): p.detach().float().cpu().clone()
                for n, p in model.named_parameters()
                if not p.requires_grad
            }
        engine = build_engine(model, ds_config or self.ds_config, self.wd)
        self._attach_scheduler(engine)
        return engine

    def _attach_scheduler(self, engine) -> None:
        t = self.cfg.train
        warmup = (
            t.lr_warmup_steps if t.lr_warmup_steps is not None else round(t.lr_warmup_epochs * self.steps_per_epoch)
        )
        self.scheduler = build_scheduler(engine.optimizer, self.total_steps, warmup, t.min_lr)
        set_lr(self.scheduler, self.state.step)

    def _dtype(self) -> torch.dtype:
        if self.engine.bfloat16_enabled():
            return torch.bfloat16
        if self.engine.fp16_enabled():
            return torch.float16
        return torch.float32

    # ----------------------------------------------------------------- phases
    def _start_phase(self, name: str, ranks: dict[str, int] | None) -> None:
        if self.state.history:
            self.state.history[-1]["end_step"] = self.state.step
        if ranks is not None:
            self.state.ranks = ranks
        self.state.phase = name
        # epochs completed when the phase starts (a switch at an epoch end starts with the next epoch)
        start_epoch = self.state.epoch + (1 if self._at_epoch_end else 0)
        self.state.history.append({"name": name, "start_step": self.state.step, "start_epoch": start_epoch})

    def _record_params(self) -> None:
        trainable, total = count_params(self.engine.module)
        self.state.history[-1].update(trainable_params=trainable, total_params=total)
        if self.monitor:
            self.monitor.scalars(self.state.step, {"params/trainable": trainable, "params/total": total})
            self.monitor.log(
                f"[{self.state.phase}] step {self.state.step}: {trainable:,} of {total:,} parameters trainable "
                f"({100 * trainable / total:.1f}%)"
            )

    def switch_to(self, name: str, ranks: dict[str, int] | None = None, merge_lora: bool = False) -> float:
        """Rebuild the engine in-process for phase `name`; returns the switch time in seconds.

        `merge_lora`: fold the current LoRA deltas into the base (in fp32) first, for a new rank layout.
        """
        t0 = time.perf_counter()
        self.op = f"the engine rebuild for phase {name} at step {self.state.step} (fp32 master gather)"
        scales = lora_scales(self.engine.module) if merge_lora else {}
        self.state.history[-1]["peak_memory_bytes"] = memory_bytes()
        self._start_phase(name, ranks)
        old, self.engine = self.engine, None
        self.engine, self.frozen_fp32, _ = rebuild(
            old,
            self.frozen_fp32,
            self._make_model,
            self.ds_config,
            self.wd,
            transform=(lambda state: merge_lora_state(state, scales)) if merge_lora else None,
        )
        del old
        reset_peak_memory()  # each phase's peak is its own (the rebuild's transient peak counts in neither)
        self._attach_scheduler(self.engine)
        elapsed = time.perf_counter() - t0
        self.state.history[-1]["switch_s"] = elapsed
        self._record_params()
        if self.monitor:
            self.monitor.text("phase", f"step {self.state.step}: -> {name} ({elapsed:.2f} s)", self.state.step)
            self.monitor.scalars(self.state.step, {"phase/index": list(PHASES).index(name), "phase/switch_s": elapsed})
        return elapsed

    # ----------------------------------------------------------------- PreLoRA decisions
    def _sample_due(self, epoch_end: bool) -> bool:
        p = self.cfg.prelora
        if not p.enabled:
            return False
        if p.window_steps is None and p.sample_every_steps is None:
            return epoch_end
        every = p.sample_every_steps or max(1, (p.window_steps or 1) // 4)
        return not epoch_end and self.state.step % every == 0

    def _window_due(self, epoch_end: bool) -> bool:
        p = self.cfg.prelora
        if p.window_steps is not None:
            return not epoch_end and self.state.step % p.window_steps == 0
        return epoch_end and (self.state.epoch + 1) % p.window_epochs == 0

    def _sample(self, epoch_end: bool) -> None:
        """Norm sample, window close and the convergence test (`full`, and `relora` on the effective
        weights W + s B A); after the switch, base / LoRA / effective norms for monitoring."""
        if not self._sample_due(epoch_end):
            return
        if self.state.phase in ("warmup", "lora") and not self._window_due(epoch_end):
            return  # after the switch the norms are for monitoring only: once a window is enough
        step, module = self.state.step, self.engine.module
        self.op = f"the all-reduce of the norm statistics at step {step}"
        pending, self.pending_loss = self.pending_loss.tolist(), _zero_loss()  # the one host read of the losses
        if self.state.phase == "full":
            sampled, loss_sum, count = norms.sample(module, self.layout, self.frozen_fp32, self.rank, *pending)
        else:
            values, loss_sum, count = norms.lora_norms(
                module, self.layout, self.frozen_fp32, self.rank, self.world, *pending
            )
            self._log_lora_norms(values)
            sampled = norms.effective_by_module(self.layout, values)
        if self.state.phase not in ("full", "relora"):
            return
        if count > 0:
            self.acc.add_sample(loss_sum, count, sampled)
        if self.monitor:
            scalars = {}
            for m, vals in sampled.items():
                scalars[f"norm/{m}"] = sum(vals) / len(vals)
                scalars.update({f"norm_layer/{m}/{i:02d}": v for i, v in enumerate(vals)})
            self.monitor.scalars(step, scalars)
        if self._window_due(epoch_end) and self.acc.num_pending:
            self.acc.close_window()
            self._convergence_check()

    def _convergence_check(self) -> None:
        p = self.cfg.prelora
        loss_w, norm_w = self.acc.loss_windows, self.acc.norm_windows
        k = len(loss_w) - 1
        record: dict[str, Any] = {
            "step": self.state.step,
            "epoch": self.state.epoch,
            "window": k,
            "phase": self.state.phase,
        }
        if k >= 1:
            record["dL"] = loss_change(loss_w, k)
            record["D"] = module_changes(norm_w, k)
            if self.monitor:
                self.monitor.scalars(
                    self.state.step,
                    {"window/dL": record["dL"], "window/delta_l": p.delta_l, "window/delta_w": p.delta_w}
                    | {f"window/D/{m}": v for m, v in record["D"].items()},
                )
        passed = partial_convergence(loss_w, norm_w, p.num_windows, p.delta_w, p.delta_l)
        epochs_done = self.state.epoch + (0 if p.window_steps is not None else 1)
        if p.min_epochs is not None and epochs_done < p.min_epochs:
            passed = False
        forced = p.max_epochs is not None and epochs_done >= p.max_epochs and p.window_steps is None
        if self.cfg.relora.enabled and self.state.phase == "full":  # relora comes first; only record
            passed = forced = False
        self.op = f"the all-reduce of the switch decision at step {self.state.step}"
        decision = dist.agree(passed or forced, "the PreLoRA switch")
        record.update(passed=passed, forced=forced)
        self.state.checks.append(record)
        self.state.windows = self.acc.state_dict()
        self._write_windows()
        if decision:
            self._switch_to_lora(forced)

    def _write_windows(self) -> None:
        """windows.json: what tools/replay_convergence.py needs to replay the test at other thresholds."""
        if self.rank != 0:
            return
        p = self.cfg.prelora
        windows = {
            "checks": self.state.checks,
            "layers": self.layout.modules,
            "thresholds": {
                "delta_w": p.delta_w,
                "delta_l": p.delta_l,
                "num_windows": p.num_windows,
                "window_steps": p.window_steps,
                "window_epochs": p.window_epochs,
                "r_min": p.r_min,
                "r_max": p.r_max,
            },
            **self.acc.state_dict(),
        }
        (self.out_dir / "windows.json").write_text(json.dumps(windows, indent=1))

    def _switch_to_lora(self, forced: bool) -> None:
        p = self.cfg.prelora
        if self.acc.num_closed >= 2:
            changes = layer_changes(self.acc.norm_windows)
        else:  # forced by max_epochs before two windows exist: no evidence, the middle rank everywhere
            changes = {m: [0.0] * len(v) for m, v in self.layout.modules.items()}
        per_module = assign_ranks(changes, p.r_min, p.r_max)
        ranks = ranks_by_module_name(self.layout.modules, per_module)
        self.state.switch_step, self.state.switch_epoch = self.state.step, self.state.epoch
        warm = p.warmup_steps if p.warmup_steps is not None else p.warmup_epochs
        phase = "warmup" if warm > 0 else "lora"
        elapsed = self.switch_to(phase, ranks, merge_lora=self.state.phase == "relora")
        self._write_ranks(ranks, changes, forced, elapsed)
        self.save_checkpoint()

    def _write_ranks(self, ranks: dict[str, int], changes, forced: bool, elapsed: float) -> None:
        if self.rank != 0:
            return
        (self.out_dir / "ranks.json").write_text(json.dumps(ranks, indent=1))
        step = self.state.step
        self.monitor.histogram("ranks/histogram", list(ranks.values()), step)
        self.monitor.scalars(step, {f"ranks/{name}": r for name, r in ranks.items()})
        self.monitor.text(
            "switch",
            f"switch at step {step} (epoch {self.state.epoch}, {'forced by max_epochs' if forced else 'test passed'}), "
            f"{elapsed:.2f} s; layer changes {json.dumps(changes)}",
            step,
        )
        self.monitor.log(f"PreLoRA switch at step {step}: ranks {sorted(set(ranks.values()))} written to ranks.json")

    def _maybe_freeze(self, epoch_end: bool) -> None:
        """warmup -> lora after prelora.warmup_steps (or warmup_epochs at an epoch end)."""
        if self.state.phase != "warmup":
            return
        p = self.cfg.prelora
        start = self.state.history[-1]
        if p.warmup_steps is not None:
            due = not epoch_end and self.state.step - start["start_step"] >= p.warmup_steps
        else:
            due = epoch_end and self.state.epoch + 1 - start["start_epoch"] >= p.warmup_epochs
        if due:
            self.switch_to("lora")
            self.save_checkpoint()

    def _log_lora_norms(self, values: dict[str, dict[str, float]]) -> None:
        if self.monitor:
            scalars = {}
            for layer, v in values.items():
                scalars.update({f"lora_norm/{kind}/{layer}": x for kind, x in v.items()})
            for kind in ("base", "lora", "effective"):
                scalars[f"lora_norm/{kind}/mean"] = sum(v[kind] for v in values.values()) / len(values)
            self.monitor.scalars(self.state.step, scalars)

    # ----------------------------------------------------------------- ReLoRA
    def _relora_start_step(self) -> int | None:
        return next((h["start_step"] for h in self.state.history if h["name"] == "relora"), None)

    def _maybe_start_relora(self, epoch_end: bool) -> None:
        """full -> relora at relora.start_step (or at the end of epoch relora.start_epoch)."""
        r = self.cfg.relora
        if not r.enabled or self.state.phase != "full":
            return
        if r.start_step is not None:
            due = not epoch_end and self.state.step >= r.start_step
        else:
            due = epoch_end and self.state.epoch + 1 >= r.start_epoch
        if due:
            self.switch_to("relora", {n: r.rank for n in self.layout.layers})
            # the relora phase must pass the test on its own windows, not on those of `full`
            self.acc = WindowAccumulator(self.cfg.prelora.window_value)
            self.pending_loss = _zero_loss()
            self.save_checkpoint()

    def _maybe_merge(self) -> None:
        """Every relora.merge_every_steps in `relora`: merge, re-initialise, prune the Adam state."""
        r = self.cfg.relora
        start = self._relora_start_step()
        if self.state.phase != "relora" or not relora.merge_due(self.state.step, start, r.merge_every_steps):
            return
        t0 = time.perf_counter()
        self.op = f"the ReLoRA merge at step {self.state.step}"
        module = self.engine.module
        deltas = relora.merge_and_reinit(module, self.frozen_fp32, self.cfg.train.seed, self.state.relora_merges)
        relora.link_optimizer_state(self.engine.optimizer)
        pruned = relora.prune_optimizer_state(module, r.prune_ratio, r.reset == "full")
        self.state.relora_merges += 1
        elapsed = time.perf_counter() - t0
        self.state.merge_s.append(elapsed)
        if self.monitor:
            self.monitor.scalars(
                self.state.step,
                {
                    "relora/merges": self.state.relora_merges,
                    "relora/merged_delta_norm": math.sqrt(sum(d * d for d in deltas.values())),
                    "relora/pruned_share": pruned,
                    "relora/merge_s": elapsed,
                },
            )

    def _lr_factor(self) -> float:
        """The jagged cosine of `relora` (a re-warmup after each merge); `prelora.lora_lr_scale` in `lora`."""
        if self.state.phase == "lora":
            return self.cfg.prelora.lora_lr_scale
        if self.state.phase != "relora":
            return 1.0
        r = self.cfg.relora
        return relora.restart_factor(
            self.state.step, self._relora_start_step(), r.merge_every_steps, r.restart_warmup_steps
        )

    # ----------------------------------------------------------------- steps
    def train_step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """One optimizer step over `accum` micro batches; returns this rank's mean loss as a 0-dim tensor on
        the device. The losses stay on the device (no host sync per micro batch): they are read when logged
        or sampled."""
        engine, dtype = self.engine, self._dtype()
        lr = set_lr(self.scheduler, self.state.step, self._lr_factor())
        step = self.state.step + 1
        self.op = f"forward/backward/optimizer step {step} (ZeRO gradient reduce and parameter all-gather)"
        pending = self.pending_loss.to(engine.device)
        total = torch.zeros((), dtype=torch.float64, device=engine.device)
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
            n = torch.isfinite(value).double() * images.shape[0]
            pending += torch.stack([torch.nan_to_num(value, nan=0.0, posinf=0.0, neginf=0.0) * n, n])
        self.pending_loss = pending
        self.last_lr = lr
        self._count_bad_step(step)
        return total / len(micro_batches)

    def _count_bad_step(self, step: int) -> None:
        """DeepSpeed skips a step whose gradient is non-finite (all ranks agree: its overflow flag and
        the global norm are all-reduced). Count it; stop after train.max_bad_steps in a row."""
        if self.engine.was_step_applied():
            self.state.bad_streak = 0
            return
        self.state.skipped_steps += 1
        self.state.bad_streak += 1
        limit = self.cfg.train.max_bad_steps
        if self.monitor:
            self.monitor.scalars(step, {"train/skipped_steps": self.state.skipped_steps})
            self.monitor.log(
                f"step {step}: non-finite loss or gradient, step skipped by DeepSpeed "
                f"({self.state.bad_streak} in a row, {self.state.skipped_steps} in all; the limit is {limit} in a row)"
            )
        if self.state.bad_streak >= limit:
            first = step - self.state.bad_streak + 1
            done = checkpoint.complete_tags(self.ckpt_dir)
            raise TrainingError(
                f"steps {first}-{step}: {self.state.bad_streak} consecutive steps with a non-finite loss or "
                f"gradient (train.max_bad_steps={limit}); stopping without saving. The last good checkpoint is "
                f"{self.ckpt_dir / done[-1] if done else 'none (no checkpoint was saved yet)'}. Lower the "
                "learning rate or check the data, then run the same command with --resume."
            )

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Exact top-1/top-5 over the whole val set (no padded duplicates), all-reduced."""
        engine, dtype = self.engine, self._dtype()
        engine.eval()
        counts = TopKCounts(engine.device)
        for images, targets in self.val_loader:
            images = images.to(engine.device, non_blocking=True)
            targets = targets.to(engine.device, non_blocking=True)
            counts.add(engine(images.to(dtype)).float(), targets, self.eval_loss)
        engine.train()
        self.op = f"the all-reduce of the validation counts at step {self.state.step}"
        result = {**counts.reduce(), "step": self.state.step, "epoch": self.state.epoch, "wall_s": self.state.wall_s}
        self.state.val.append(result)
        if self.monitor:
            self.monitor.scalars(
                self.state.step, {"val/top1": result["top1"], "val/top5": result["top5"], "val/loss": result["loss"]}
            )
            self.monitor.log(
                f"epoch {self.state.epoch} step {self.state.step} [{self.state.phase}]: "
                f"val top-1 {result['top1']:.2f}% top-5 {result['top5']:.2f}% loss {result['loss']:.4f}"
            )
        return result

    # ----------------------------------------------------------------- checkpoints
    def _trainer_state(self) -> dict[str, Any]:
        self.state.windows = self.acc.state_dict()
        return {
            "loop": self.state.__dict__,
            "config": self.cfg.to_dict(),
            "world_size": self.world,
            "model": self.cfg.model.name,
            "num_classes": self.data.num_classes,
            "train_batch_size": self.ds_config["train_batch_size"],
            "micro_batch": self.micro,
            "steps_per_epoch": self.steps_per_epoch,
        }

    def save_checkpoint(self) -> None:
        t0 = time.perf_counter()
        self.saved_step = self.state.step
        self.op = f"the checkpoint save of step {self.state.step} (barriers between the ranks' writes)"
        checkpoint.save(
            self.engine,
            self.ckpt_dir,
            self.state.step,
            self._trainer_state(),
            {"pending_loss": self.pending_loss.tolist()},
            self.frozen_fp32 if self.rank == 0 else None,
            self.rank,
            self.cfg.train.keep_checkpoints,
        )
        if self.monitor:
            self.monitor.scalars(self.state.step, {"checkpoint/save_s": time.perf_counter() - t0})

    def _resume(self) -> None:
        t0 = time.perf_counter()
        self._load_checkpoint()
        if self.rank == 0 and self.state.step:
            print(
                f"resumed at step {self.state.step} (epoch {self.state.epoch}, phase {self.state.phase}) in "
                f"{time.perf_counter() - t0:.1f} s",
                flush=True,
            )

    def _load_checkpoint(self) -> None:
        tag, msg = checkpoint.find_resume(self.ckpt_dir)
        if self.rank == 0:
            print(msg, flush=True)
        if tag is None:
            self._start_phase("full", None)
            self.engine = self._fresh_engine()
            return
        tag_dir = self.ckpt_dir / tag
        saved = checkpoint.read_trainer_state(tag_dir)
        problems = checkpoint.layout_mismatch(saved, self.cfg, self.data.num_classes, self.ds_config)
        if problems:
            raise TrainingError(checkpoint.mismatch_message(tag_dir, problems))
        self.state = LoopState(**saved["loop"])
        if self.state.windows:
            self.acc.load_state_dict(self.state.windows)
        saved_world = saved.get("world_size", self.world)
        self._map_epoch_position(saved, tag)
        ds_config, load_tag = self.ds_config, tag
        if saved_world != self.world:
            load_tag = self._resume_on_new_world(saved, tag)
            universal = {**self.ds_config.get("checkpoint", {}), "load_universal": True}
            ds_config = {**self.ds_config, "checkpoint": universal}
        self.op = f"loading checkpoint {tag_dir}"
        self.engine = self._fresh_engine(keep_frozen=False, ds_config=ds_config)
        self.frozen_fp32 = checkpoint.read_frozen_fp32(tag_dir)
        load_path, _ = self.engine.load_checkpoint(str(self.ckpt_dir), tag=load_tag)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {self.ckpt_dir / load_tag}")
        if self.frozen_fp32:  # the module holds bf16 copies; the exact base is the kept fp32
            load_fp32_state(self.engine.module, self.frozen_fp32)
        if saved_world == self.world:
            rank_state = checkpoint.read_rank_state(tag_dir, self.rank)
            if rank_state is not None:
                self.pending_loss = torch.tensor(rank_state["pending_loss"], dtype=torch.float64)
                checkpoint.set_rng_state(rank_state["rng"])
        else:  # the loss sums of every saved rank go to rank 0; RNG of the same rank number where one exists
            states = [checkpoint.read_rank_state(tag_dir, r) for r in range(saved_world)]
            if self.rank == 0:
                self.pending_loss = torch.tensor([sum(st["pending_loss"][i] for st in states if st) for i in range(2)],
                                                 dtype=torch.float64)
            if self.rank < saved_world and states[self.rank] is not None:
                checkpoint.set_rng_state(states[self.rank]["rng"])

    def _map_epoch_position(self, saved: dict[str, Any], tag: str) -> None:
        """The position in the epoch is kept in micro batches per rank; with another micro batch or world size
        it is re-expressed from the images consumed (same global batch, so always a whole number of steps)."""
        old_micro, old_world = saved.get("micro_batch", self.micro), saved.get("world_size", self.world)
        if (old_micro, old_world) == (self.micro, self.world):
            return
        images = self.state.batch_in_epoch * old_micro * old_world
        if images % (self.micro * self.world):
            raise TrainingError(
                f"checkpoint {tag} stopped after {images} images of epoch {self.state.epoch}, not a whole number of "
                f"micro batches of {self.micro} on {self.world} rank(s); keep train_batch_size the same."
            )
        self.state.batch_in_epoch = images // (self.micro * self.world)

    def _resume_on_new_world(self, saved: dict[str, Any], tag: str) -> str:
        """A checkpoint of another world size: convert it to DeepSpeed's universal format (rank 0, once) and
        map the position in the epoch from images consumed; returns the tag to load."""
        saved_world = saved["world_size"]
        t0 = time.perf_counter()
        if self.rank == 0:
            checkpoint.to_universal(self.ckpt_dir, tag)
        self.op = f"waiting for rank 0 to convert {tag} to a universal checkpoint"
        dist.barrier()
        images = self.state.batch_in_epoch * self.micro * self.world  # already mapped to this world
        if self.rank == 0:
            print(
                f"resuming {tag}, saved by {saved_world} rank(s), on {self.world} rank(s): converted to a DeepSpeed "
                f"universal checkpoint ({self.ckpt_dir / (tag + checkpoint.UNIVERSAL_SUFFIX)}, "
                f"{time.perf_counter() - t0:.1f} s); global batch {self.ds_config['train_batch_size']} = "
                f"{self.micro} micro x {self.accum} accumulation x {self.world} rank(s); continuing at image "
                f"{images} of epoch {self.state.epoch}",
                flush=True,
            )
            if saved.get("steps_per_epoch", self.steps_per_epoch) != self.steps_per_epoch:
                print(
                    f"warning: an epoch is now {self.steps_per_epoch} steps (it was {saved['steps_per_epoch']}): "
                    "the sampler's padding differs by world size; the LR schedule follows the new count.",
                    flush=True,
                )
        return tag + checkpoint.UNIVERSAL_SUFFIX

    # ----------------------------------------------------------------- loop
    def _epoch_batches(self):
        """Micro batches of the current epoch from the resume position, grouped per optimizer step."""
        sampler = self.train_loader.sampler
        sampler.set_epoch(self.state.epoch)
        self.train_loader.dataset.set_epoch(self.state.epoch)
        sampler.skip(self.state.batch_in_epoch * self.micro)
        group = []
        for batch in self.train_loader:
            group.append(batch)
            if len(group) == self.accum:
                yield group
                group = []

    def _stop_requested(self) -> bool:
        stop = self.cfg.train.stop_at_step
        return stop is not None and self.state.step == stop and self.state.step < self.total_steps

    def _checkpoint_due(self) -> bool:
        every = self.cfg.train.checkpoint_every_steps
        return every > 0 and self.state.step % every == 0

    def _log_step(self, loss: torch.Tensor, dt: float) -> None:
        step = self.state.step
        times = self.state.step_times.setdefault(self.state.phase, [])
        times.append(dt)
        del times[:-MAX_STEP_TIMES]
        if step % self.cfg.train.log_every_steps == 0 or step == self.total_steps:
            self.op = f"the all-reduce of the logged loss at step {step}"
            mean_loss = dist.all_reduce_sum([float(loss)])[0] / self.world
            imgs = self.ds_config["train_batch_size"] / dt
            grad_norm = self.engine.get_global_grad_norm()
            if self.monitor:
                scalars = {
                    "train/loss": mean_loss,
                    "train/lr": self.last_lr,
                    "train/images_per_s": imgs,
                    "train/step_s": dt,
                    "train/memory_bytes": memory_bytes(),
                }
                if grad_norm is not None and math.isfinite(float(grad_norm)):
                    scalars["train/grad_norm"] = float(grad_norm)
                self.monitor.scalars(step, scalars)
                self.monitor.progress(
                    step, loss=f"{mean_loss:.4f}", lr=f"{self.last_lr:.2e}", img_s=f"{imgs:.0f}", phase=self.state.phase
                )
        elif self.monitor:
            self.monitor.progress(step)

    def _stop(self, decision: preempt.StopDecision) -> None:
        """Checkpoint this step (unless a switch just did) and end the run early: pre-empted, or train.stop_at_step."""
        step = self.state.step
        if self.saved_step != step:
            self.save_checkpoint()
        where = self.ckpt_dir / checkpoint.tag_for(step)
        if decision.stop:
            self.preempted = decision
            elapsed = time.time() - decision.first_signal_time
            self.monitor.scalars(step, {"preempt/signal_to_saved_s": elapsed})
            if self.rank == 0:  # for a scheduler script: the deepspeed launcher exits 1 when it was signalled itself
                marker = {"signal": decision.signal_name, "step": step, "phase": self.state.phase,
                          "checkpoint": str(where), "signal_to_saved_s": elapsed, "exit_code": preempt.EXIT_CODE}
                (self.out_dir / preempt.MARKER).write_text(json.dumps(marker, indent=1))
            budget = "within" if elapsed < preempt.LAUNCHER_GRACE_S else "NOT within"
            self.monitor.log(
                f"pre-empted by {decision.signal_name}: every rank stopped after step {step} ({self.state.phase}); "
                f"checkpoint {where} complete {elapsed:.1f} s after the first signal ({budget} the deepspeed "
                f"launcher's {preempt.LAUNCHER_GRACE_S:.0f} s before SIGKILL). Continue with the same command and "
                f"--resume (exit code {preempt.EXIT_CODE}: requeue)."
            )
        else:
            self.monitor.log(f"stopped at step {step} (train.stop_at_step); continue with --resume")
        self.monitor.close()
        return None

    def train(self) -> dict[str, Any] | None:
        """Run to the end (returns the summary) or to train.stop_at_step (returns None).

        Raises TrainingError (message for the user) for a collective timeout, a checkpoint that could
        not be written, or too many non-finite steps in a row."""
        try:
            return self._train()
        except RuntimeError as exc:
            if self.monitor:  # keep what TensorBoard has of the steps before the failure
                self.monitor.close()
            if isinstance(exc, TrainingError):
                raise
            if isinstance(exc, checkpoint.CheckpointWriteError):
                raise TrainingError(str(exc)) from exc
            lost = dist.peer_lost(exc)  # a rank whose process or node died: its sockets close at once
            if not (is_timeout(exc) or lost):
                raise
            done = checkpoint.complete_tags(self.ckpt_dir)
            why = ("failed: another rank closed its connection (its process or node died)" if lost else
                   f"timed out after train.collective_timeout_s={self.cfg.train.collective_timeout_s:g} s waiting "
                   "for another rank (dead, hung or cut off)")
            raise TrainingError(
                f"rank {self.rank}: {self.op} {why}. The "
                f"last complete checkpoint is {self.ckpt_dir / done[-1] if done else 'none'}; restart the job "
                f"with --resume. ({str(exc).splitlines()[0][:200]})"
            ) from exc

    def _train(self) -> dict[str, Any] | None:
        self.monitor = Monitor(self.out_dir, self.rank, self.total_steps, self.state.step)
        if self.rank == 0:
            (self.out_dir / preempt.MARKER).unlink(missing_ok=True)  # this run continues it
        if not self.state.history[-1].get("trainable_params"):
            self._record_params()
        t_start = time.perf_counter() - self.state.wall_s
        self.engine.train()
        while self.state.step < self.total_steps:
            t_last = time.perf_counter()
            for group in self._epoch_batches():
                loss = self.train_step(group)
                self.state.step += 1
                self.state.batch_in_epoch += self.accum
                if faults.active():
                    faults.after_step(self.state.step, self.rank)
                now = time.perf_counter()
                self._log_step(loss, now - t_last)
                self._maybe_start_relora(epoch_end=False)
                self._maybe_merge()
                self._sample(epoch_end=False)
                self._maybe_freeze(epoch_end=False)
                self.state.wall_s = time.perf_counter() - t_start
                self.op = f"the all-reduce of the stop request after step {self.state.step}"
                decision = self.stop_request.agreed()  # every step: a signal stops every rank after the same step
                if decision.stop or self._stop_requested():
                    return self._stop(decision)
                if self._checkpoint_due() and self.state.step < self.total_steps:
                    self.save_checkpoint()
                t_last = time.perf_counter()
                if self.state.step >= self.total_steps:
                    break
            epoch_done = self.state.batch_in_epoch >= self.steps_per_epoch * self.accum
            if epoch_done:
                self._at_epoch_end = True
                if (self.state.epoch + 1) % self.cfg.train.eval_every_epochs == 0:
                    self.validate()
                self._sample(epoch_end=True)
                self._maybe_start_relora(epoch_end=True)
                self._maybe_freeze(epoch_end=True)
                self.state.epoch += 1
                self.state.batch_in_epoch = 0
                self._at_epoch_end = False
                if self.state.step < self.total_steps:
                    self.save_checkpoint()
        if not self.state.val or self.state.val[-1]["step"] != self.state.step:
            self.validate()
        self.state.wall_s = time.perf_counter() - t_start
        self.state.history[-1].update(end_step=self.state.step, peak_memory_bytes=memory_bytes())
        self.save_checkpoint()
        summary = self.finish()
        self.monitor.close()
        return summary

    # ----------------------------------------------------------------- outputs
    def summary(self) -> dict[str, Any]:
        phases = []
        for h in self.state.history:
            times = self.state.step_times.get(h["name"], [])
            phases.append(
                {
                    "name": h["name"],
                    "start_step": h["start_step"],
                    "end_step": h.get("end_step", self.state.step),
                    "trainable_params": h.get("trainable_params"),
                    "total_params": h.get("total_params"),
                    "median_step_s": statistics.median(times) if times else None,
                    "switch_s": h.get("switch_s"),
                    "peak_memory_bytes": h.get("peak_memory_bytes"),
                }
            )
        final = self.state.val[-1] if self.state.val else {}
        return {
            "phases": phases,
            "switch_step": self.state.switch_step,
            "relora_merges": self.state.relora_merges,
            "relora_merge_s": statistics.median(self.state.merge_s) if self.state.merge_s else None,
            "switch_epoch": self.state.switch_epoch,
            "final_val_top1": final.get("top1"),
            "final_val_top5": final.get("top5"),
            "val": self.state.val,
            "steps": self.state.step,
            "steps_per_epoch": self.steps_per_epoch,
            "epochs": self.state.epoch,
            "wall_time_s": self.state.wall_s,
            "world_size": self.world,
            "train_batch_size": self.ds_config["train_batch_size"],
            "model": self.cfg.model.name,
            "skipped_steps": self.state.skipped_steps,
        }

    def finish(self) -> dict[str, Any]:
        """summary.json, window statistics and the merged fp32 model (rank 0 writes; gather is collective)."""
        state = gather_fp32_state(self.engine, self.frozen_fp32)
        summary = self.summary()
        summary["skipped_images"] = int(dist.all_reduce_sum([float(self.data.num_skipped)])[0])
        if summary["skipped_images"] and self.monitor:
            self.monitor.log(f"warning: {summary['skipped_images']} unreadable images were skipped (see the log)")
        if self.rank == 0:
            save_merged(self.out_dir / "model_merged.safetensors", state, lora_scales(self.engine.module))
            (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
            self._write_windows()
        return summary

    def close(self) -> None:
        if self.engine is not None:
            self.engine.destroy()
            self.engine = None


def _zero_loss() -> torch.Tensor:
    """(sum of per-image losses, images): float64, moved to the engine's device by the first train_step."""
    return torch.zeros(2, dtype=torch.float64)
