"""Parameter access that works under every ZeRO stage (docs/design.md §4).

Under ZeRO-1/2 every rank holds each module parameter whole (in the compute dtype) and its own slice of
the fp32 masters. Under ZeRO-3 a module parameter outside a forward is an empty placeholder: its values
live in per-rank partitions (`p.ds_tensor`, `p.ds_numel` elements in all), trainable or frozen. Reading or
writing a whole value is then a collective, so every function here that may gather is called by every
rank, for the same parameters, in the same order.
"""

from __future__ import annotations

import torch


def is_zero3(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


def numel(p: torch.Tensor) -> int:
    """The parameter's full element count (a ZeRO-3 placeholder's own numel is 0)."""
    return int(p.ds_numel) if is_zero3(p) else p.numel()


def full_value(p: torch.nn.Parameter) -> torch.Tensor:
    """The whole parameter in fp32 on CPU: the fp32 master when the optimizer holds one, else the module's
    value (gathered under ZeRO-3). Collective under ZeRO-3."""
    if p.requires_grad:
        from deepspeed.utils import safe_get_full_fp32_param

        full = safe_get_full_fp32_param(p)  # all-gathered from the partitions: a fresh tensor
        if full is not None:
            return full.detach().float().cpu().view(p.ds_shape if is_zero3(p) else p.shape)
    if is_zero3(p):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            return p.detach().float().cpu().clone()
    return p.detach().float().cpu().clone()


def write_module_value(p: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Set the module's copy of `p` (in its dtype) to `value`, on every rank. Collective under ZeRO-3 (every
    rank passes the same value; the partitions are re-cut from it)."""
    with torch.no_grad():
        if not is_zero3(p):
            p.copy_(value.to(p.device, p.dtype))
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            p.copy_(value.to(p.device, p.dtype).view(p.shape))


def write_master(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Set a trainable parameter's fp32 master (its partition fragments) and its module copy."""
    from deepspeed.utils import safe_set_full_fp32_param

    safe_set_full_fp32_param(param, value.to(torch.device("cpu") if is_zero3(param) else param.device))
    write_module_value(param, value)


def local_sumsq(p: torch.nn.Parameter) -> torch.Tensor:
    """sum(p^2) over this rank's ZeRO-3 partition of the module copy (the padding at the end excluded): summed
    over ranks it is the whole parameter's. For frozen parameters, which have no fp32 master."""
    part = p.ds_tensor.detach().flatten()
    start = part.numel() * _partition_rank(p)
    valid = max(0, min(part.numel(), int(p.ds_numel) - start))
    t = part[:valid].float()
    return torch.dot(t, t) if valid else t.new_zeros(())


def _partition_rank(p: torch.nn.Parameter) -> int:
    import torch.distributed as tdist

    group = getattr(p, "ds_process_group", None)
    return tdist.get_rank(group=group)
