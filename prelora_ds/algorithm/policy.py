"""When PreLoRA samples, closes a window, switches and moves on: pure functions of the loop's clock and the recipe.

The trainer and `prelora replay` both decide through `switch_decision`, so a replay at other
thresholds is the trainer's decision, not a copy of it. The phases and the test are in docs/design.md.

Where the loop is (`Clock`): after optimizer step `step` of epoch `epoch` (0-based), or at the end of that
epoch (`epoch_end`, after its last step). Windows of steps close mid-epoch, windows of epochs at an epoch's end.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from prelora_ds.algorithm.convergence import layer_changes, num_norm_windows, partial_convergence
from prelora_ds.algorithm.ranks import assign_ranks, ranks_by_module_name
from prelora_ds.config.sections import PreLoRAConfig, ReLoRAConfig


@dataclass(frozen=True)
class Clock:
    step: int
    epoch: int
    epoch_end: bool = False

    @property
    def epochs_done(self) -> int:
        """Epochs completed: the current one counts only at its end."""
        return self.epoch + (1 if self.epoch_end else 0)


def sample_interval(p: PreLoRAConfig) -> int:
    """Steps between norm samples with windows of steps: `sample_every_steps`, else a quarter window."""
    return p.sample_every_steps or max(1, (p.window_steps or 1) // 4)


def window_due(p: PreLoRAConfig, clock: Clock) -> bool:
    """Whether a window closes now."""
    if p.window_steps is not None:
        return not clock.epoch_end and clock.step % p.window_steps == 0
    return clock.epoch_end and clock.epochs_done % p.window_epochs == 0


def sample_due(p: PreLoRAConfig, phase: str, clock: Clock) -> bool:
    """Whether the norms are sampled now. Before the switch they feed the test; after it (warmup, lora) they
    are for monitoring only, so one sample per window is enough."""
    if not p.enabled:
        return False
    if p.window_steps is None:
        due = clock.epoch_end
    else:
        due = not clock.epoch_end and clock.step % sample_interval(p) == 0
    if phase in ("warmup", "lora"):
        return due and window_due(p, clock)
    return due


def tests_convergence(phase: str) -> bool:
    """The phases whose samples go into the convergence windows (`relora` on the effective weights)."""
    return phase in ("full", "relora")


@dataclass(frozen=True)
class Decision:
    passed: bool  # the partial-convergence test passed (and min_epochs allows it)
    forced: bool  # max_epochs reached without a pass
    reason: str

    @property
    def switch(self) -> bool:
        return self.passed or self.forced


def switch_decision(
    loss_windows: list[float],
    norm_windows: dict[str, list[list[float]]],
    epochs_done: int,
    p: PreLoRAConfig,
    relora_active: bool,
) -> Decision:
    """Whether to switch to LoRA now, from the closed windows and the epochs completed.

    `relora_active`: ReLoRA is enabled and has not started yet; it comes first, so nothing switches.
    `max_epochs` forces the switch even with fewer than two windows (the ranks then carry no evidence).
    """
    if relora_active:
        return Decision(False, False, "ReLoRA runs first (relora.enabled, before relora.start_*)")
    passed = len(loss_windows) >= p.num_windows and partial_convergence(
        loss_windows, norm_windows, p.num_windows, p.delta_w, p.delta_l
    )
    if passed and p.min_epochs is not None and epochs_done < p.min_epochs:
        return Decision(False, False, f"the test passed, but only {epochs_done} of min_epochs={p.min_epochs} done")
    if passed:
        return Decision(True, False, "the partial-convergence test passed")
    if p.max_epochs is not None and epochs_done >= p.max_epochs:
        return Decision(False, True, f"forced by max_epochs={p.max_epochs} ({epochs_done} epochs done)")
    if len(loss_windows) < p.num_windows:
        return Decision(False, False, f"{len(loss_windows)} of num_windows={p.num_windows} windows closed")
    return Decision(False, False, "the test did not pass")


def switch_ranks(norm_windows: Mapping[str, Sequence[Sequence[float]]], layers: Mapping[str, Sequence[str]],
                 r_min: int, r_max: int, bounds: Mapping[str, tuple[int, int]] | None = None,
                 ) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Algorithm 2 at a switch: (d_{m,l} per module, full layer name -> rank). With fewer than two closed windows
    (a switch forced by max_epochs) there is no evidence: every layer gets the middle rank. The trainer and the
    replay tool both call this. ``bounds``: each module's own (r_min, r_max) (prelora.rank_reference_width)."""
    if norm_windows and num_norm_windows(norm_windows) >= 2:
        changes = layer_changes(norm_windows)
    else:
        changes = {m: [0.0] * len(names) for m, names in layers.items()}
    return changes, ranks_by_module_name(layers, assign_ranks(changes, r_min, r_max, bounds))


def phase_after_switch(p: PreLoRAConfig) -> str:
    """`warmup` (base + LoRA) unless its length is zero, then straight to `lora`."""
    warm = p.warmup_steps if p.warmup_steps is not None else p.warmup_epochs
    return "warmup" if warm > 0 else "lora"


def warmup_done(p: PreLoRAConfig, clock: Clock, start_step: int, start_epoch: int) -> bool:
    """warmup -> lora after `warmup_steps` steps, or at the end of the epoch that completes `warmup_epochs`
    (counted from `start_epoch`, the epochs completed when warmup began)."""
    if p.warmup_steps is not None:
        return not clock.epoch_end and clock.step - start_step >= p.warmup_steps
    return clock.epoch_end and clock.epochs_done - start_epoch >= p.warmup_epochs


def relora_start_due(r: ReLoRAConfig, clock: Clock) -> bool:
    """full -> relora at step `start_step`, or at the end of epoch `start_epoch` (1-based: epochs done)."""
    if not r.enabled:
        return False
    if r.start_step is not None:
        return not clock.epoch_end and clock.step >= r.start_step
    return clock.epoch_end and clock.epochs_done >= r.start_epoch


def restart_factor(step: int, start: int, every: int, warmup: int, end: int | None = None) -> float:
    """Jagged-cosine multiplier for optimizer step `step` (0-based): a linear re-warmup from 0 after each merge.

    Merges happen once steps `start + k * every` (k >= 1) are done; the `warmup` steps after each merge run
    at 0, 1/warmup, ..., (warmup-1)/warmup of the cosine, then 1 (as ReLoRA's restarts). The first step after
    a merge only refills the Adam moments of the fresh factors. Outside `relora` (before `start + every`,
    from `end` on) the factor is 1.
    """
    if warmup <= 0 or step < start + every or (end is not None and step >= end):
        return 1.0
    since = (step - start) % every
    return min(1.0, since / warmup)


def rewarmup_factor(step: int, start: int | None, warmup: int) -> float:
    """LR multiplier for optimizer step `step` (0-based) on the parameters whose Adam state started fresh at a
    rebuild after `start` steps (None: no rebuild): 0, 1/warmup, ..., (warmup-1)/warmup, then 1, as ReLoRA's
    restarts (the first step fills the fresh moments)."""
    if start is None or warmup <= 0 or not start <= step < start + warmup:
        return 1.0
    return (step - start) / warmup


def revived_lr_scale(step: int, start: int | None, r: ReLoRAConfig, warmup_steps: int) -> float:
    """LR factor of the base revived at `relora -> warmup` (the rebuild after `start` steps) for optimizer step
    `step` (0-based): `warmup_base_lr_scale`; with `warmup_base_lr_ramp` it rises linearly from there at the
    switch to 1 at the end of `warmup` (`warmup_steps` long) and stays at 1."""
    scale = r.warmup_base_lr_scale
    if not r.warmup_base_lr_ramp or start is None or warmup_steps <= 0:
        return scale
    return scale + (1.0 - scale) * min(max(step - start, 0) / warmup_steps, 1.0)


def merge_due(step: int, start: int | None, every: int) -> bool:
    """Whether the ReLoRA merge runs after optimizer step `step` (the count of steps done); `start`: the step
    `relora` began (None: not started)."""
    return start is not None and step > start and (step - start) % every == 0


def lr_factor(phase: str, step: int, relora_start: int | None, p: PreLoRAConfig, r: ReLoRAConfig) -> float:
    """Factor on the LR schedule: ReLoRA's jagged restart in `relora`, `lora_lr_scale` in `lora`, else 1."""
    if phase == "lora":
        return p.lora_lr_scale
    if phase != "relora" or relora_start is None:
        return 1.0
    return restart_factor(step, relora_start, r.merge_every_steps, r.restart_warmup_steps)
