"""LR schedule: linear warmup + cosine (timm), a function of the global optimizer step only.

The scheduler is re-attached to each new engine's optimizer after a rebuild and driven with
`step_update(global_step)`, so the LR is continuous across engine switches and restarts.
"""

from __future__ import annotations

from timm.scheduler import CosineLRScheduler
from torch.optim import Optimizer


def build_scheduler(optimizer: Optimizer, total_steps: int, warmup_steps: int, min_lr: float) -> CosineLRScheduler:
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    return CosineLRScheduler(
        optimizer,
        t_initial=max(total_steps - warmup_steps, 1),
        lr_min=min_lr,
        warmup_t=warmup_steps,
        warmup_lr_init=min_lr,
        warmup_prefix=True,
        t_in_epochs=False,
    )


def set_lr(scheduler: CosineLRScheduler, global_step: int, factor: float = 1.0) -> float:
    """Set the optimizer's LR for optimizer step `global_step` (0-based) and return it.

    `factor` scales the cosine value (ReLoRA's jagged re-warmup after a merge, `policy.restart_factor`). A group
    with an `lr_scale` key (timm's: the revived base, `moments.param_groups`) gets that multiple of it.
    """
    scheduler.step_update(global_step)
    groups = scheduler.optimizer.param_groups
    if factor != 1.0:
        for group in groups:
            group["lr"] *= factor
    return float(next((g for g in groups if "lr_scale" not in g), groups[0])["lr"])
