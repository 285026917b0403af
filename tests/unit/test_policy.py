"""The switch policy as pure functions: when to sample, when a window closes, whether to switch."""

from __future__ import annotations

import dataclasses
import re

import pytest

from prelora_ds.algorithm import policy
from prelora_ds.algorithm.policy import Clock, merge_due, restart_factor, switch_decision
from prelora_ds.config.sections import PreLoRAConfig, ReLoRAConfig
from prelora_ds.errors import ConfigError

STEPS = PreLoRAConfig(window_steps=8, num_windows=3, delta_w=1.0, delta_l=1.0)
EPOCHS = PreLoRAConfig(window_epochs=2, num_windows=3, delta_w=1.0, delta_l=1.0)
FLAT = ([2.0, 2.0, 2.0], {"attn.qkv": [[1.0, 1.0]] * 3})  # windows that pass any threshold
MOVING = ([4.0, 3.0, 2.0], {"attn.qkv": [[1.0, 1.0], [1.5, 1.5], [2.0, 2.0]]})  # never pass 1 %


def test_step_windows_sample_every_quarter_window_and_close_mid_epoch():
    due = [s for s in range(1, 25) if policy.sample_due(STEPS, "full", Clock(s, 0))]
    assert due == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24]  # sample_every_steps defaults to window_steps // 4
    assert [s for s in range(1, 25) if policy.window_due(STEPS, Clock(s, 0))] == [8, 16, 24]
    assert not policy.sample_due(STEPS, "full", Clock(8, 0, epoch_end=True))  # epoch ends add no sample
    custom = dataclasses.replace(STEPS, sample_every_steps=3)
    assert [s for s in range(1, 10) if policy.sample_due(custom, "full", Clock(s, 0))] == [3, 6, 9]


def test_epoch_windows_sample_at_each_epoch_end_and_close_every_window_epochs():
    assert not policy.sample_due(EPOCHS, "full", Clock(5, 0))
    assert [e for e in range(6) if policy.sample_due(EPOCHS, "full", Clock(0, e, epoch_end=True))] == list(range(6))
    closes = [e for e in range(6) if policy.window_due(EPOCHS, Clock(0, e, epoch_end=True))]
    assert closes == [1, 3, 5]  # the ends of epochs 2, 4, 6 (1-based): epochs_done % window_epochs == 0


def test_after_the_switch_one_sample_per_window_for_monitoring():
    assert [s for s in range(1, 17) if policy.sample_due(STEPS, "lora", Clock(s, 0))] == [8, 16]
    assert not policy.sample_due(dataclasses.replace(STEPS, enabled=False), "full", Clock(8, 0))


def test_decision_passes_only_with_num_windows_and_min_epochs():
    assert switch_decision(*FLAT, 0, STEPS, relora_active=False).passed
    assert not switch_decision(FLAT[0][:2], {"attn.qkv": FLAT[1]["attn.qkv"][:2]}, 0, STEPS, False).switch
    held = switch_decision(*FLAT, 1, dataclasses.replace(STEPS, min_epochs=2), False)
    assert not held.switch and "min_epochs=2" in held.reason
    assert switch_decision(*FLAT, 2, dataclasses.replace(STEPS, min_epochs=2), False).passed
    assert not switch_decision(*MOVING, 0, STEPS, False).switch


@pytest.mark.parametrize("p", [STEPS, EPOCHS], ids=["window_steps", "window_epochs"])
def test_max_epochs_forces_the_switch_with_either_window_unit(p):
    """The trainer used to ignore max_epochs when window_steps was set."""
    p = dataclasses.replace(p, max_epochs=3)
    assert not switch_decision(*MOVING, 2, p, False).switch
    forced = switch_decision(*MOVING, 3, p, False)
    assert forced.forced and not forced.passed and "max_epochs=3" in forced.reason


def test_max_epochs_forces_before_two_windows_exist():
    p = dataclasses.replace(EPOCHS, max_epochs=1)
    assert switch_decision([], {}, 1, p, False).forced
    assert switch_decision([2.0], {"attn.qkv": [[1.0]]}, 1, p, False).forced


def test_relora_comes_first():
    p = dataclasses.replace(STEPS, max_epochs=1)
    decision = switch_decision(*FLAT, 5, p, relora_active=True)
    assert not decision.switch and "ReLoRA" in decision.reason


def test_warmup_and_relora_start_in_steps_or_epochs():
    p = dataclasses.replace(STEPS, warmup_steps=4)
    assert not policy.warmup_done(p, Clock(13, 0), start_step=10, start_epoch=0)
    assert policy.warmup_done(p, Clock(14, 0), start_step=10, start_epoch=0)
    q = dataclasses.replace(EPOCHS, warmup_epochs=2)  # warmup began at the end of epoch index 2 (3 epochs done)
    assert not policy.warmup_done(q, Clock(0, 3, epoch_end=True), start_step=0, start_epoch=3)
    assert policy.warmup_done(q, Clock(0, 4, epoch_end=True), start_step=0, start_epoch=3)
    assert not policy.warmup_done(q, Clock(99, 4), start_step=0, start_epoch=3)  # only at an epoch end
    assert policy.phase_after_switch(dataclasses.replace(EPOCHS, warmup_epochs=0)) == "lora"
    r = ReLoRAConfig(enabled=True, start_epoch=2)
    assert [e for e in range(4) if policy.relora_start_due(r, Clock(0, e, epoch_end=True))] == [1, 2, 3]
    assert not policy.relora_start_due(r, Clock(100, 5))
    assert policy.relora_start_due(ReLoRAConfig(enabled=True, start_step=5), Clock(5, 0))


def test_lr_factor_by_phase():
    p, r = dataclasses.replace(STEPS, lora_lr_scale=0.1), ReLoRAConfig(enabled=True, start_step=0,
                                                                        merge_every_steps=4, restart_warmup_steps=2)
    assert policy.lr_factor("lora", 50, None, p, r) == 0.1
    assert policy.lr_factor("warmup", 50, 0, p, r) == 1.0
    assert [policy.lr_factor("relora", s, 0, p, r) for s in range(3, 8)] == [1.0, 0.0, 0.5, 1.0, 1.0]


def test_sample_every_steps_needs_window_steps():
    with pytest.raises(ConfigError, match="window_steps"):
        PreLoRAConfig(sample_every_steps=10)


def test_restart_factor_around_a_merge():
    start, every, warm = 10, 5, 3
    # before the first merge (steps 10..14 run at the plain cosine), and outside relora
    assert [restart_factor(s, start, every, warm) for s in range(0, 15)] == [1.0] * 15
    # merge after step 15 is done: steps 15, 16, 17 ramp from 0 (0, 1/3, 2/3), then 1 until the next merge
    assert [restart_factor(s, start, every, warm) for s in range(15, 21)] == [0.0, 1 / 3, 2 / 3, 1.0, 1.0, 0.0]
    assert restart_factor(25, start, every, warm, end=25) == 1.0  # relora over: plain cosine again
    assert restart_factor(16, start, every, 0) == 1.0  # no re-warmup configured
    assert [restart_factor(s, 0, 4, 4) for s in range(4, 9)] == [0.0, 0.25, 0.5, 0.75, 0.0]  # warmup = cycle


def test_merge_due_every_n_steps_after_start():
    assert [s for s in range(0, 31) if merge_due(s, 10, 5)] == [15, 20, 25, 30]


def test_rewarmup_factor_after_a_rebuild():
    assert [policy.rewarmup_factor(s, 10, 4) for s in range(8, 16)] == [1.0, 1.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert policy.rewarmup_factor(10, None, 4) == 1.0  # an engine no rebuild made (a new run's first build)
    assert policy.rewarmup_factor(10, 10, 0) == 1.0  # no re-warmup configured


@pytest.mark.parametrize(
    ("fields", "message"),
    [({"switch_optimizer": "keep"}, "prelora.switch_optimizer='keep' is unknown; write carry or reset"),
     ({"switch_rewarmup_steps": -1}, "prelora.switch_rewarmup_steps must be >= 0")],
)
def test_switch_optimizer_fields_are_validated(fields, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        PreLoRAConfig(**fields)


def test_revived_lr_scale_is_constant_or_ramps_to_one_across_warmup():
    flat = ReLoRAConfig(warmup_base_lr_scale=0.1, warmup_base_lr_ramp=False)
    assert [policy.revived_lr_scale(s, 10, flat, 4) for s in (10, 12, 20)] == [0.1, 0.1, 0.1]
    ramp = ReLoRAConfig(warmup_base_lr_scale=0.2, warmup_base_lr_ramp=True)
    # the switch after 10 steps, a 4-step warmup: 0.2 at its first step, +0.2 a step, 1.0 from its end on
    got = [policy.revived_lr_scale(s, 10, ramp, 4) for s in range(10, 16)]
    assert got == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0], abs=1e-12)
    assert policy.revived_lr_scale(12, None, ramp, 4) == 0.2  # no rebuild made this engine: nothing ramps
    assert policy.revived_lr_scale(12, 10, ramp, 0) == 0.2  # no warmup length known
