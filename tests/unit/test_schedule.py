"""LR schedule on a real timm CosineLRScheduler driving a real torch AdamW: a function of the global step only."""

from __future__ import annotations

import math

import pytest
import torch

from prelora_ds.engine.schedule import build_scheduler, set_lr

PEAK, MIN_LR, TOTAL, WARMUP = 1e-3, 1e-5, 100, 10


def optimizer(lr: float = PEAK) -> torch.optim.AdamW:
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], lr=lr)


def scheduler(total: int = TOTAL, warmup: int = WARMUP, min_lr: float = MIN_LR):
    return build_scheduler(optimizer(), total, warmup, min_lr)


def expected(step: int, total: int = TOTAL, warmup: int = WARMUP) -> float:
    if step < warmup:
        return MIN_LR + step * (PEAK - MIN_LR) / warmup
    t = min(step - warmup, total - warmup)
    return MIN_LR + 0.5 * (PEAK - MIN_LR) * (1 + math.cos(math.pi * t / (total - warmup)))


def test_step0_is_min_lr_and_sets_the_optimizer():
    sched = scheduler()
    assert set_lr(sched, 0) == pytest.approx(MIN_LR, rel=1e-9)
    assert sched.optimizer.param_groups[0]["lr"] == pytest.approx(MIN_LR, rel=1e-9)


@pytest.mark.parametrize("step", [1, 3, 5, 9])
def test_linear_warmup(step):
    lr = set_lr(scheduler(), step)
    assert lr == pytest.approx(MIN_LR + step * (PEAK - MIN_LR) / WARMUP, rel=1e-9)


def test_warmup_rises_strictly():
    sched = scheduler()
    lrs = [set_lr(sched, s) for s in range(WARMUP + 1)]
    assert all(a < b for a, b in zip(lrs, lrs[1:], strict=False))


def test_peak_at_end_of_warmup():
    sched = scheduler()
    assert set_lr(sched, WARMUP) == pytest.approx(PEAK, rel=1e-9)
    assert set_lr(sched, WARMUP - 1) < PEAK


def test_cosine_midpoint():
    lr = set_lr(scheduler(), WARMUP + (TOTAL - WARMUP) // 2)
    assert lr == pytest.approx((PEAK + MIN_LR) / 2, rel=1e-9)


@pytest.mark.parametrize("step", [0, 4, 10, 11, 30, 77, 99, 100])
def test_matches_formula(step):
    assert set_lr(scheduler(), step) == pytest.approx(expected(step), rel=1e-9)


def test_min_lr_at_the_end():
    sched = scheduler()
    assert set_lr(sched, TOTAL) == pytest.approx(MIN_LR, rel=1e-9)
    last = set_lr(sched, TOTAL - 1)  # the last optimizer step (0-based) is within one cosine step of the floor
    assert MIN_LR < last < MIN_LR + (PEAK - MIN_LR) * (1 - math.cos(math.pi / (TOTAL - WARMUP)))
    assert set_lr(sched, TOTAL + 5) == pytest.approx(MIN_LR, rel=1e-9)  # past the end it stays at the floor


def test_monotone_non_increasing_after_warmup():
    sched = scheduler()
    lrs = [set_lr(sched, s) for s in range(WARMUP, TOTAL + 1)]
    assert all(b <= a for a, b in zip(lrs, lrs[1:], strict=False))
    assert lrs[0] > lrs[-1]


def test_function_of_the_step_only():
    sched = scheduler()
    first = set_lr(sched, 50)
    assert set_lr(sched, 10) == pytest.approx(PEAK, rel=1e-9)
    assert set_lr(sched, 50) == first
    assert first == pytest.approx(expected(50), rel=1e-9)


def test_rebuilt_optimizer_gives_identical_values():
    a, b = scheduler(), scheduler()  # an engine rebuild: a new optimizer, a new scheduler on it
    for _ in range(5):  # the old one was driven for a while; the new one starts wherever training is
        set_lr(a, 7)
    for step in (0, 5, 10, 42, 63, 99, 100):
        assert set_lr(a, step) == set_lr(b, step)
        assert a.optimizer.param_groups[0]["lr"] == b.optimizer.param_groups[0]["lr"]


def test_peak_comes_from_the_optimizer_lr():
    sched = build_scheduler(optimizer(lr=5e-4), TOTAL, WARMUP, MIN_LR)
    assert set_lr(sched, WARMUP) == pytest.approx(5e-4, rel=1e-9)


@pytest.mark.parametrize("warmup", [20, 25, 1000])
def test_warmup_longer_than_total_is_clipped(warmup):
    total = 20
    sched = scheduler(total=total, warmup=warmup)
    assert set_lr(sched, 0) == pytest.approx(MIN_LR, rel=1e-9)
    # clipped to total - 1: the linear rise spans total - 1 steps and reaches the peak at the last step
    assert set_lr(sched, 10) == pytest.approx(MIN_LR + 10 * (PEAK - MIN_LR) / (total - 1), rel=1e-9)
    assert set_lr(sched, total - 1) == pytest.approx(PEAK, rel=1e-9)
    assert set_lr(sched, total) == pytest.approx(MIN_LR, rel=1e-9)


def test_no_warmup_starts_at_peak():
    sched = scheduler(warmup=0)
    assert set_lr(sched, 0) == pytest.approx(PEAK, rel=1e-9)
    assert set_lr(sched, TOTAL // 2) == pytest.approx((PEAK + MIN_LR) / 2, rel=1e-9)
