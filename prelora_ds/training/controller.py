"""The phase changes of a run, carried out after each step: norm samples into the convergence windows, the
switch decision (`policy.switch_decision`, agreed by every rank), the per-layer ranks, ReLoRA's start and
merges, the end of warmup. `policy` decides when; this module does it, on the `PhaseEngine`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import torch

from prelora_ds.algorithm import policy
from prelora_ds.algorithm.convergence import WindowAccumulator, loss_change, module_changes
from prelora_ds.algorithm.policy import Clock
from prelora_ds.config.sections import RunConfig
from prelora_ds.distributed import collectives
from prelora_ds.engine import norms
from prelora_ds.engine.phase_engine import PhaseEngine
from prelora_ds.metrics.memory import memory_bytes
from prelora_ds.metrics.recorder import Recorder, windows_file


def zero_loss() -> torch.Tensor:
    """(sum of per-image losses, images): float64, moved to the engine's device by the first train_step."""
    return torch.zeros(2, dtype=torch.float64)


class PhaseController:
    """Owns the convergence windows and this rank's pending loss sums; reads and writes the loop state."""

    def __init__(self, cfg: RunConfig, phases: PhaseEngine, recorder: Recorder, rank: int, world: int,
                 collective: Callable[[str], contextlib.AbstractContextManager]) -> None:  # fmt: skip
        self.cfg, self.phases, self.recorder, self.rank, self.world = cfg, phases, recorder, rank, world
        self.collective = collective
        self.acc = WindowAccumulator(cfg.prelora.window_value)
        self.pending_loss = zero_loss()  # this rank's (sum of per-image losses, images) since the last sample
        self.save_pending = False  # a phase changed: the step wants a checkpoint

    def after_step(self, state, clock: Clock) -> None:
        """Everything due after optimizer step `clock.step` (or at the end of its epoch), in this order:
        sample -> switch decision -> ReLoRA start -> ReLoRA merge -> end of warmup."""
        p, r = self.cfg.prelora, self.cfg.relora
        closed = self._sample(state, clock) if policy.sample_due(p, state.phase, clock) else False
        forcing_due = clock.epoch_end and p.max_epochs is not None
        if p.enabled and policy.tests_convergence(state.phase) and (closed or forcing_due):
            self._decide(state, clock, closed)
        if state.phase == "full" and policy.relora_start_due(r, clock):
            self.switch_to(state, "relora", {n: r.rank for n in self.phases.layout.layers}, clock.epochs_done)
            self.acc = WindowAccumulator(p.window_value)  # relora passes the test on windows of its own
            self.pending_loss = zero_loss()
        in_relora = state.phase == "relora" and not clock.epoch_end
        if in_relora and policy.merge_due(clock.step, relora_start(state), r.merge_every_steps):
            self._merge(state)
        start = state.history[-1]
        if state.phase == "warmup" and policy.warmup_done(p, clock, start["start_step"], start["start_epoch"]):
            self.switch_to(state, "lora", start_epoch=clock.epochs_done)

    def _sample(self, state, clock: Clock) -> bool:
        """Norm sample: into the windows in `full` (and `relora`, on the effective weights W + s B A); base /
        LoRA / effective norms for monitoring after the switch. Returns whether a window closed."""
        module, layout, frozen = self.phases.module, self.phases.layout, self.phases.frozen_fp32
        pending, self.pending_loss = self.pending_loss.tolist(), zero_loss()  # the one host read of the losses
        with self.collective(f"the all-reduce of the norm statistics at step {clock.step}"):
            if state.phase == "full":
                sampled, loss_sum, count = norms.sample(module, layout, frozen, self.rank, *pending)
            else:
                values, loss_sum, count = norms.lora_norms(module, layout, frozen, self.rank, self.world, *pending)
                self.recorder.lora_norms(clock.step, values)
                sampled = norms.effective_by_module(layout, values)
        if not policy.tests_convergence(state.phase):
            return False
        if count > 0:
            self.acc.add_sample(loss_sum, count, sampled)
        self.recorder.norms(clock.step, sampled)
        if policy.window_due(self.cfg.prelora, clock) and self.acc.num_pending:
            self.acc.close_window()
            return True
        return False

    def _decide(self, state, clock: Clock, closed: bool) -> None:
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
        changes, ranks = policy.switch_ranks(norm_w, self.phases.layout.modules, p.r_min, p.r_max)
        state.switch_step, state.switch_epoch = clock.step, clock.epoch
        elapsed = self.switch_to(state, policy.phase_after_switch(p), ranks, clock.epochs_done,
                                 merge_lora=state.phase == "relora")
        self.recorder.switch(clock.step, clock.epoch, ranks, changes, decision.reason, elapsed)

    def switch_to(self, state, name: str, ranks: dict[str, int] | None = None, start_epoch: int | None = None,
                  merge_lora: bool = False) -> float:
        """Rebuild the engine in-process for phase `name`; returns the switch time in seconds. `merge_lora`:
        fold the LoRA deltas into the base (fp32) first. `start_epoch`: epochs done when the phase starts."""
        state.history[-1]["peak_memory_bytes"] = memory_bytes()
        start_phase(state, name, ranks, state.epoch if start_epoch is None else start_epoch)
        with self.collective(f"the engine rebuild for phase {name} at step {state.step} (fp32 master gather)"):
            elapsed = self.phases.rebuild(name, ranks, state.step, merge_lora)
        state.history[-1]["switch_s"] = elapsed
        self.record_params(state)
        self.recorder.phase_change(state.step, name, elapsed)
        self.save_pending = True
        return elapsed

    def record_params(self, state) -> None:
        trainable, total = self.phases.count_params()
        state.history[-1].update(trainable_params=trainable, total_params=total)
        self.recorder.params(state.step, state.phase, trainable, total)

    def _merge(self, state) -> None:
        """ReLoRA: merge, re-initialise, prune the Adam state (every relora.merge_every_steps in `relora`)."""
        t0 = time.perf_counter()
        with self.collective(f"the ReLoRA merge at step {state.step}"):
            deltas, pruned = self.phases.merge_relora(self.cfg.train.seed, state.relora_merges)
        state.relora_merges += 1
        state.merge_s.append(time.perf_counter() - t0)
        self.recorder.merge(state.step, state.relora_merges, deltas, pruned, state.merge_s[-1])

    def write_windows(self, state) -> None:
        self.recorder.write_json("windows.json", windows_file(state.checks, self.phases.layout.modules,
                                                              self.cfg.prelora, self.acc.state_dict()))


def start_phase(state, name: str, ranks: dict[str, int] | None, start_epoch: int) -> None:
    """Record in the loop state that phase `name` starts at the current step."""
    if state.history:
        state.history[-1]["end_step"] = state.step
    if ranks is not None:
        state.ranks = ranks
    state.phase = name
    state.history.append({"name": name, "start_step": state.step, "start_epoch": start_epoch})


def relora_start(state) -> int | None:
    """The step `relora` began (None: it has not)."""
    return next((h["start_step"] for h in state.history if h["name"] == "relora"), None)
