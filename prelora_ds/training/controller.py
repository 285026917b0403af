"""The phase changes of a run, carried out after each step: norm samples into the convergence windows, the
switch decision (`policy.switch_decision`, agreed by every rank), the per-layer ranks, ReLoRA's start and
merges, the end of warmup. `policy` decides when; this module does it, on the `PhaseEngine`.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from prelora_ds.algorithm import policy
from prelora_ds.algorithm.convergence import WindowAccumulator, loss_change, module_changes
from prelora_ds.algorithm.policy import Clock
from prelora_ds.config.sections import RunConfig
from prelora_ds.distributed import collectives
from prelora_ds.engine import norms
from prelora_ds.engine.phase_engine import PhaseEngine
from prelora_ds.metrics.recorder import Recorder, windows_file
from prelora_ds.training.loop_state import LoopState


def zero_loss() -> torch.Tensor:
    """(sum of per-image losses, images): float64, moved to the engine's device by the first train_step."""
    return torch.zeros(2, dtype=torch.float64)


class PhaseController:
    """Owns the convergence windows and this rank's loss sums since the last sample; changes the loop state's phase
    (through `LoopState.start_phase`) and the engine's structure together."""

    def __init__(self, cfg: RunConfig, phases: PhaseEngine, recorder: Recorder, rank: int, world: int,
                 collective: collectives.NamedCollectives) -> None:  # fmt: skip
        self.cfg, self.phases, self.recorder, self.rank, self.world = cfg, phases, recorder, rank, world
        self.collective = collective
        self.acc = WindowAccumulator(cfg.prelora.window_value)
        self.pending_loss = zero_loss()  # this rank's (sum of per-image losses, images) since the last sample

    # ----------------------------------------------------------------- the loss between samples
    def add_loss(self, value: torch.Tensor, images: int) -> None:
        """One micro batch's mean loss (0-dim float64 on the device: no host sync) over `images` images; a skipped
        step's non-finite loss must not poison the convergence test's loss windows, so it counts as no images."""
        n = torch.isfinite(value).double() * images
        self.pending_loss = self.pending_loss.to(value.device) + torch.stack(
            [torch.nan_to_num(value, nan=0.0, posinf=0.0, neginf=0.0) * n, n]
        )

    def pending_loss_sums(self) -> list[float]:
        """(sum of per-image losses, images) since the last sample, for this rank's checkpoint file."""
        return self.pending_loss.tolist()

    def restore_pending_loss(self, sums: torch.Tensor) -> None:
        self.pending_loss = sums

    # ----------------------------------------------------------------- after each step
    def after_step(self, state: LoopState, clock: Clock) -> bool:
        """Everything due after optimizer step `clock.step` (or at the end of its epoch), in this order:
        sample -> switch decision -> ReLoRA start -> ReLoRA merge -> end of warmup. Returns whether the phase
        changed (the step then wants a checkpoint)."""
        p, r, phase_before = self.cfg.prelora, self.cfg.relora, state.phase
        closed = self._sample(state, clock) if policy.sample_due(p, state.phase, clock) else False
        forcing_due = clock.epoch_end and p.max_epochs is not None
        if p.enabled and policy.tests_convergence(state.phase) and (closed or forcing_due):
            self._decide(state, clock, closed)
        if state.phase == "full" and policy.relora_start_due(r, clock):
            self.switch_to(state, "relora", {n: r.rank for n in self.phases.layout.layers}, clock.epochs_done)
            self.acc = WindowAccumulator(p.window_value)  # relora passes the test on windows of its own
            self.pending_loss = zero_loss()
        in_relora = state.phase == "relora" and not clock.epoch_end
        if in_relora and policy.merge_due(clock.step, state.relora_start(), r.merge_every_steps):
            self._merge(state)
        start = state.current
        if state.phase == "warmup" and policy.warmup_done(p, clock, start.start_step, start.start_epoch):
            self.switch_to(state, "lora", start_epoch=clock.epochs_done)
        return state.phase != phase_before

    def _sample(self, state: LoopState, clock: Clock) -> bool:
        """Norm sample: into the windows in `full` (and `relora`, on the effective weights W + s B A); the module
        norms of every phase (effective after the switch) and base / LoRA / effective per layer for monitoring.
        Returns whether a window closed."""
        module, layout, frozen = self.phases.module, self.phases.layout, self.phases.frozen_fp32
        pending, self.pending_loss = self.pending_loss.tolist(), zero_loss()  # the one host read of the losses
        with self.collective(f"the all-reduce of the norm statistics at step {clock.step}"):
            if state.phase == "full":
                sampled, loss_sum, count = norms.sample(module, layout, frozen, self.rank, *pending)
            else:
                values, loss_sum, count = norms.lora_norms(module, layout, frozen, self.rank, self.world, *pending)
                self.recorder.lora_norms(clock.step, values)
                sampled = norms.effective_by_module(layout, values)
        self.recorder.norms(clock.step, sampled)  # every phase: the effective weight W + s B A after the switch
        if not policy.tests_convergence(state.phase):
            return False
        if count > 0:
            self.acc.add_sample(loss_sum, count, sampled)
        if policy.window_due(self.cfg.prelora, clock) and self.acc.num_pending:
            self.acc.close_window()
            return True
        return False

    def _decide(self, state: LoopState, clock: Clock, closed: bool) -> None:
        """The switch decision (at a window close, or at an epoch end for max_epochs), agreed by every rank."""
        p, loss_w, norm_w = self.cfg.prelora, self.acc.loss_windows, self.acc.norm_windows
        relora_first = self.cfg.relora.enabled and state.phase == "full"
        decision = policy.switch_decision(loss_w, norm_w, clock.epochs_done, p, relora_first)
        if closed:  # one record per closed window: what windows.json and the replay tool read
            k = len(loss_w) - 1
            record: dict[str, Any] = {"step": clock.step, "epoch": clock.epoch, "window": k, "phase": state.phase}
            if k >= 1:
                record.update(dL=loss_change(loss_w, k), D=module_changes(norm_w, k))
                self.recorder.window(clock.step, record["dL"], record["D"], p.delta_l, p.delta_w)
            record.update(passed=decision.passed, forced=decision.forced, reason=decision.reason)
            state.checks.append(record)
            self.write_windows(state)
        with self.collective(f"the all-reduce of the switch decision at step {clock.step}"):
            agreed = collectives.agree(decision.switch, "the PreLoRA switch")
        if not agreed:
            return
        changes, ranks = policy.switch_ranks(norm_w, self.phases.layout.modules, p.r_min, p.r_max,
                                             self.phases.rank_bounds)
        state.switch_step, state.switch_epoch = clock.step, clock.epoch
        elapsed = self.switch_to(state, policy.phase_after_switch(p), ranks, clock.epochs_done,
                                 merge_lora=state.phase == "relora")
        self.recorder.switch(clock.step, clock.epoch, ranks, changes, decision.reason, elapsed)

    def switch_to(self, state: LoopState, name: str, ranks: dict[str, int] | None = None,
                  start_epoch: int | None = None, merge_lora: bool = False) -> float:
        """Rebuild the engine in-process for phase `name`; returns the switch time in seconds. `merge_lora`:
        fold the LoRA deltas into the base (fp32) first. `start_epoch`: epochs done when the phase starts."""
        state.current.peak_memory_bytes = self.recorder.peak_memory()
        state.start_phase(name, ranks, state.epoch if start_epoch is None else start_epoch)
        with self.collective(f"the engine rebuild for phase {name} at step {state.step} (fp32 master gather)"):
            elapsed = self.phases.rebuild(name, state.ranks, state.step, merge_lora)
        self.recorder.start_phase_peak()
        state.current.switch_s = elapsed
        self.record_params(state)
        self.recorder.phase_change(state.step, name, elapsed)
        return elapsed

    def record_params(self, state: LoopState) -> None:
        trainable, total = self.phases.count_params()
        state.current.trainable_params, state.current.total_params = trainable, total
        self.recorder.params(state.step, state.phase, trainable, total)

    def _merge(self, state: LoopState) -> None:
        """ReLoRA: merge, re-initialise, prune the Adam state (every relora.merge_every_steps in `relora`)."""
        t0 = time.perf_counter()
        with self.collective(f"the ReLoRA merge at step {state.step}"):
            deltas, pruned = self.phases.merge_relora(self.cfg.train.seed, state.relora_merges)
        state.relora_merges += 1
        state.merge_s.append(time.perf_counter() - t0)
        self.recorder.merge(state.step, state.relora_merges, deltas, pruned, state.merge_s[-1])

    def write_windows(self, state: LoopState) -> None:
        self.recorder.write_json("windows.json", windows_file(state.checks, self.phases.layout.modules,
                                                              self.phases.rank_bounds,
                                                              self.cfg.prelora, self.acc.state_dict()))

