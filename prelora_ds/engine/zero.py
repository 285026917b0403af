"""Parameter access that works under every ZeRO stage (docs/design.md §4).

Under ZeRO-1/2 every rank holds each module parameter whole (in the compute dtype) and its own slice of
the fp32 masters. Under ZeRO-3 a module parameter outside a forward is an empty placeholder: its values
live in per-rank partitions (`p.ds_tensor`, `p.ds_numel` elements in all), trainable or frozen. Reading or
writing a whole value is then a collective, so every function here that may gather is called by every
rank, for the same parameters, in the same order.
"""

from __future__ import annotations

import contextlib

import torch


def is_zero3(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


def numel(p: torch.Tensor) -> int:
    """The parameter's full element count (a ZeRO-3 placeholder's own numel is 0)."""
    return int(p.ds_numel) if is_zero3(p) else p.numel()


def shape(p: torch.Tensor) -> torch.Size:
    """The parameter's full shape (a ZeRO-3 placeholder's own shape is empty)."""
    return torch.Size(p.ds_shape) if is_zero3(p) else p.shape


def full_value(p: torch.nn.Parameter) -> torch.Tensor:
    """The whole parameter in fp32 on CPU: the fp32 master when the optimizer holds one, else the module's
    value (gathered under ZeRO-3). Collective under ZeRO-3."""
    if p.requires_grad:
        from deepspeed.utils import safe_get_full_fp32_param

        full = safe_get_full_fp32_param(p)  # all-gathered from the partitions: a fresh tensor
        if full is not None:
            return full.detach().float().cpu().view(shape(p))
    if is_zero3(p):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            return p.detach().float().cpu().clone()
    return p.detach().float().cpu().clone()


def write_module_value(p: torch.nn.Parameter, value: torch.Tensor | None, src: int = 0) -> None:
    """Set the module's copy of `p` (in its dtype) to `value`, on every rank. Collective under ZeRO-3: the
    partitions are re-cut from rank `src`'s value, so the other ranks may pass None."""
    with torch.no_grad():
        if not is_zero3(p):
            p.copy_(value.to(p.device, p.dtype))
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters([p], modifier_rank=src):
            if value is not None:
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


@contextlib.contextmanager
def partitioned_build(ds_config: dict):
    """Construct modules inside `deepspeed.zero.Init`: each parameter is cut into its ZeRO-3 partition as soon as
    its module exists, so no rank ever holds the whole model (where the partitions live follows the config:
    the accelerator, or the CPU under `offload_param`). Weights drawn in here are placeholders' (timm's init runs
    on empty tensors), so the caller writes every parameter afterwards; the RNG is restored on exit, so building
    draws no random numbers the run would otherwise have used."""
    import deepspeed

    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices), deepspeed.zero.Init(config_dict_or_path=ds_config):
        yield


def write_from_rank0(model: torch.nn.Module, values: dict[str, torch.Tensor] | None) -> None:
    """Copy rank 0's `values` (by parameter name; None on the other ranks) into a partitioned model's ZeRO-3
    parameters, one gathered parameter at a time. Collective: every rank walks the same parameters."""
    for name, p in model.named_parameters():
        if is_zero3(p):
            write_module_value(p, None if values is None else values[name])


def local_elements(model: torch.nn.Module) -> tuple[int, int]:
    """(elements this rank holds, whole elements) over the model's parameters: the share ZeRO-3 partitioning
    leaves on a rank (about 1/world when every parameter is partitioned)."""
    held = sum(p.ds_tensor.numel() if is_zero3(p) else p.numel() for p in model.parameters())
    return held, sum(numel(p) for p in model.parameters())


def cast_unpartitioned(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast the floating tensors ZeRO-3 did not partition (modules added after `zero.Init`, e.g. PEFT's LoRA
    factors, which PEFT keeps in fp32, and buffers) to the engine's dtype: the engine casts a module only when it
    partitions it itself, and its optimizer takes one dtype per parameter group."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if not is_zero3(t) and t.is_floating_point() and t.dtype != dtype:
                t.data = t.data.to(dtype)


def forget_engine(module: torch.nn.Module | None) -> None:
    """Drop DeepSpeed's own references to a destroyed ZeRO-3 engine, which `destroy()` leaves (DeepSpeed 0.19.8) and
    through which the whole old engine stayed alive, its optimizer state and gradient partitions included (2.8 GiB a
    rank after a ViT-L/16 switch on 2 ranks; every engine of a run until the process ends):
    - `parameter_offload.FWD_MODULE_STACK`, to which each engine appends its top module and never takes it off;
    - the class-wide `functools.lru_cache` on `PartitionedParameterCoordinator.__params_to_release`, keyed by each
      engine's coordinator and submodules. Clearing it costs a live engine one recomputation per submodule."""
    try:
        from deepspeed.runtime.zero import parameter_offload
        from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator
    except ImportError:  # a DeepSpeed without ZeRO-3's offload module keeps neither
        return
    if module is not None:
        stack = getattr(parameter_offload, "FWD_MODULE_STACK", [])
        stack[:] = [m for m in stack if m is not module]
    method = getattr(PartitionedParameterCoordinator, "_PartitionedParameterCoordinator__params_to_release", None)
    for fn in (method, getattr(method, "__wrapped__", None)):  # behind DeepSpeed's nvtx wrapper, in its closure
        for cell in getattr(fn, "__closure__", None) or ():
            if hasattr(cell.cell_contents, "cache_clear"):
                cell.cell_contents.cache_clear()
