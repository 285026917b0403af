"""Adam's state across an engine rebuild (docs/design.md §4): the moments of every parameter that trains on.

A rebuild makes a new optimizer. Left fresh, every weight that keeps training restarts Adam from zero moments,
and Adam's first steps from zero move each entry by about the LR whatever its gradient's history: on the demo
top-1 fell 9 points one epoch after the switch. So the moments (`exp_avg`, `exp_avg_sq`) of each parameter
trainable before and after are read out of the old ZeRO partitions and written into the new ones, through
DeepSpeed's fragment API (`safe_get/set_full_optimizer_state`, every stage).

Bias correction follows each parameter's own history: its moments come with the step count of the flat
partition that held them. Under ZeRO-1/2 (and in ZeRO-3's sub groups) one partition shares one step count, so
the new engine's parameter groups are split by that count (`param_groups`): fresh LoRA factors (count 0) never
share a partition with base weights that carry 5,000 steps. The counts at the build (name -> count) are the
layout a checkpoint records, so a resume builds the same groups and DeepSpeed loads each group's own state.
"""

from __future__ import annotations

import torch
from deepspeed.utils import safe_get_full_optimizer_state, safe_set_full_optimizer_state

from prelora_ds.model import param_groups as weight_decay_groups
from prelora_ds.phases import canonical_name

# name -> (Adam step count, {state key: the whole fp32 tensor on CPU})
Moments = dict[str, tuple[int, dict[str, torch.Tensor]]]
COUNT = "adam_step_at_build"  # parameter-group key: the step count its parameters' moments carried in (0: fresh)


def param_groups(model: torch.nn.Module, weight_decay: float, counts: dict[str, int] | None = None) -> list[dict]:
    """The weight-decay groups, each split by the Adam step count its parameters carry into this engine (0:
    fresh). Without counts (a new run, or a reset at the switch) they are the plain weight-decay groups."""
    groups = weight_decay_groups(model, weight_decay)
    if not counts:
        return groups
    names = {id(p): canonical_name(n) for n, p in model.named_parameters()}
    split = []
    for group in groups:
        by_count: dict[int, list[torch.nn.Parameter]] = {}
        for p in group["params"]:
            by_count.setdefault(counts.get(names[id(p)], 0), []).append(p)
        for count in sorted(by_count, reverse=True):  # the same order at a switch and at the resume after it
            split.append({**group, "params": by_count[count], COUNT: count})
    return split


def _partitions(optimizer) -> list[tuple[list[torch.nn.Parameter], torch.Tensor]]:
    """(module parameters, their flat fp32 partition) for each partition the inner optimizer steps."""
    if hasattr(optimizer, "fp32_partitioned_groups_flat"):  # ZeRO-3: one flat per sub group
        return list(zip(optimizer.fp16_groups, optimizer.fp32_partitioned_groups_flat, strict=True))
    return list(zip(optimizer.bit16_groups, optimizer.single_partition_of_fp32_groups, strict=True))


def _group_ids(optimizer) -> list[int]:
    """The parameter group of each partition of `_partitions` (ZeRO-3 cuts a group into sub groups)."""
    if hasattr(optimizer, "sub_group_to_group_id"):
        return [optimizer.sub_group_to_group_id[i] for i in range(len(optimizer.fp32_partitioned_groups_flat))]
    return list(range(len(optimizer.single_partition_of_fp32_groups)))


def group_steps(optimizer) -> list[int | None]:
    """Each parameter group's Adam step count now (None: not stepped yet), for a checkpoint. Local, no collective."""
    steps: list[int | None] = [None] * len(optimizer.param_groups)
    for (_params, flat), group in zip(_partitions(optimizer), _group_ids(optimizer), strict=True):
        state = optimizer.optimizer.state.get(flat, {})
        if "step" in state:
            steps[group] = int(state["step"])
    return steps


def restore_group_steps(optimizer, steps: list[int | None]) -> None:
    """Set each partition's step count to its group's saved one after a checkpoint load: DeepSpeed's universal
    ZeRO-3 load gives every sub group the first one's count (ds_to_universal keeps no per-group step there), which
    would give fresh LoRA factors the base weights' bias correction."""
    inner = optimizer.optimizer
    for (_params, flat), group in zip(_partitions(optimizer), _group_ids(optimizer), strict=True):
        state = inner.state.get(flat, {})
        if "step" in state and group < len(steps) and steps[group] is not None:
            state["step"] = _step_value(inner, flat, steps[group]) if torch.is_tensor(state["step"]) else steps[group]


def _names(engine) -> dict[int, str]:
    return {id(p): canonical_name(n) for n, p in engine.module.named_parameters()}


def gather(engine) -> Moments:
    """Every trainable parameter's Adam moments (whole, fp32, CPU) with its step count, by canonical name;
    partitions that have not stepped yet are left out. Collective: every rank calls it, in the same order."""
    from prelora_ds.relora import link_optimizer_state

    optimizer, names = engine.optimizer, _names(engine)
    link_optimizer_state(optimizer)  # DeepSpeed links the fragments of its first group only (relora.py)
    out: Moments = {}
    for params, flat in _partitions(optimizer):
        state = optimizer.optimizer.state.get(flat, {})
        if "step" not in state:
            continue
        keys = [k for k, v in state.items() if torch.is_tensor(v) and v.shape == flat.shape]
        for p in params:
            out[names[id(p)]] = (int(state["step"]), {
                k: safe_get_full_optimizer_state(p, k).detach().float().cpu() for k in keys})  # fmt: skip
    return out


def _step_value(inner: torch.optim.Optimizer, flat: torch.Tensor, count: int):
    """A step count in the form the optimizer keeps: torch's Adam a float tensor (on the device when capturable
    or fused), DeepSpeed's FusedAdam and DeepSpeedCPUAdam a Python int."""
    if not type(inner).__module__.startswith("torch.optim"):
        return count
    on_device = inner.defaults.get("capturable") or inner.defaults.get("fused")
    return torch.tensor(float(count), dtype=torch.float32, device=flat.device if on_device else "cpu")


def write(engine, moments: Moments) -> list[str]:
    """Give the new engine's optimizer the carried moments and step counts, before its first step. Returns the
    names that were carried. Collective under ZeRO-3 (each rank copies its own slice of the whole values)."""
    from prelora_ds.relora import link_optimizer_state

    optimizer, names = engine.optimizer, _names(engine)
    inner, carried = optimizer.optimizer, []
    for params, flat in _partitions(optimizer):
        keyed = [names[id(p)] for p in params]
        counts = {moments[n][0] for n in keyed if n in moments}
        if not counts:
            continue  # fresh: the optimizer creates its state at the first step
        if len(counts) > 1 or any(n not in moments for n in keyed):
            raise RuntimeError(f"a partition mixes Adam histories {sorted(counts)} (groups not split by count)")
        keys = list(moments[keyed[0]][1])
        inner.state[flat] = {"step": _step_value(inner, flat, counts.pop()),
                             **{k: torch.zeros_like(flat) for k in keys}}  # fmt: skip
    link_optimizer_state(optimizer)
    for params, _flat in _partitions(optimizer):
        for p in params:
            name = names[id(p)]
            if name not in moments:
                continue
            for key, value in moments[name][1].items():
                safe_set_full_optimizer_state(p, value.to("cpu" if hasattr(p, "ds_id") else p.device), key)
            carried.append(name)
    return carried


def fresh_groups(optimizer) -> list[dict]:
    """The parameter groups whose Adam state started fresh in this engine (all of them without a split)."""
    return [g for g in optimizer.param_groups if not g.get(COUNT, 0)]
