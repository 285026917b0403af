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

from collections.abc import Callable

import torch
from deepspeed.utils import safe_get_full_optimizer_state, safe_set_full_optimizer_state

from prelora_ds.distributed import collectives
from prelora_ds.engine import stream, zero
from prelora_ds.engine.model import param_groups as weight_decay_groups
from prelora_ds.lora.inject import canonical_name

# name -> (Adam step count, {state key: the whole fp32 tensor on CPU})
Moments = dict[str, tuple[int, dict[str, torch.Tensor]]]
COUNT = "adam_step_at_build"  # parameter-group key: the step count its parameters' moments carried in (0: fresh)
REVIVED = "revived"  # parameter-group key: frozen in the previous phase, training again (relora -> warmup's base)


def param_groups(model: torch.nn.Module, weight_decay: float, counts: dict[str, int] | None = None,
                 revived: frozenset[str] = frozenset(), revived_lr_scale: float = 1.0) -> list[dict]:  # fmt: skip
    """The weight-decay groups, each split by the Adam step count its parameters carry into this engine (0:
    fresh) and by whether they are `revived` (names frozen in the previous phase that train again: the base in
    the `warmup` after `relora`), whose groups take `revived_lr_scale` as timm's `lr_scale` (its schedulers
    multiply a group's LR by it). Without either (a new run, a reset at the switch) the plain weight-decay
    groups."""
    groups = weight_decay_groups(model, weight_decay)
    if not counts and not revived:
        return groups
    counts = counts or {}
    names = {id(p): canonical_name(n) for n, p in model.named_parameters()}
    split = []
    for group in groups:
        by_key: dict[tuple[int, bool], list[torch.nn.Parameter]] = {}
        for p in group["params"]:
            by_key.setdefault((counts.get(names[id(p)], 0), names[id(p)] in revived), []).append(p)
        for count, back in sorted(by_key, reverse=True):  # the same order at a switch and at the resume after it
            scale = {REVIVED: True, "lr_scale": revived_lr_scale} if back else {}
            split.append({**group, "params": by_key[(count, back)], COUNT: count, **scale})
    return split


def _partitions(optimizer) -> list[tuple[list[torch.nn.Parameter], torch.Tensor]]:
    """(module parameters, the fp32 tensor the inner optimizer steps for them) for each state entry: a flat
    partition under ZeRO-1/2/3 and DeepSpeed's bf16 optimizer (stage 0), each parameter itself under a plain
    torch optimizer (fp32 stage 0)."""
    if hasattr(optimizer, "fp32_partitioned_groups_flat"):  # ZeRO-3: one flat per sub group
        return list(zip(optimizer.fp16_groups, optimizer.fp32_partitioned_groups_flat, strict=True))
    if hasattr(optimizer, "single_partition_of_fp32_groups"):  # ZeRO-1/2
        return list(zip(optimizer.bit16_groups, optimizer.single_partition_of_fp32_groups, strict=True))
    if hasattr(optimizer, "fp32_groups_flat_partition"):  # BF16_Optimizer (stage 0)
        return list(zip(optimizer.bf16_groups, optimizer.fp32_groups_flat_partition, strict=True))
    if not _flat(optimizer):
        return [([p], p) for g in optimizer.param_groups for p in g["params"]]
    return []  # another wrapper (e.g. FP16_UnfusedOptimizer): no known way to its state; gather() says so


def supported(optimizer) -> bool:
    """Whether the optimizer's state can be read and written here (ZeRO-1/2/3, BF16_Optimizer, plain torch)."""
    return not _flat(optimizer) or any(hasattr(optimizer, a) for a in (
        "fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition"))


def _inner(optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)


def _flat(optimizer) -> bool:
    """Whether the state lives in flat partitions reached through DeepSpeed's fragment API."""
    return _inner(optimizer) is not optimizer


def link_state(optimizer) -> None:
    """(Re)link every parameter to its optimizer-state fragments in the flat partitions (ZeRO-1/2, BF16_Optimizer).

    DeepSpeed 0.19.8 links them once, right after the first parameter group's first step, when the other groups
    have no state yet; with weight-decay groups the LoRA weights then have no fragments and
    `safe_get_full_optimizer_state` raises. Linking is idempotent (views into the flat state)."""
    from deepspeed.utils import lazy_init_hp_params_optimizer_state

    if hasattr(optimizer, "fp32_partitioned_groups_flat") or not _flat(optimizer):
        return  # ZeRO-3 reads its partitions directly; a plain optimizer keys its state by parameter
    state = _inner(optimizer).state
    for params, flat in _partitions(optimizer):
        if flat in state:
            lazy_init_hp_params_optimizer_state(params, flat, state)


def _group_ids(optimizer) -> list[int]:
    """The parameter group of each entry of `_partitions` (ZeRO-3 cuts a group into sub groups)."""
    if hasattr(optimizer, "sub_group_to_group_id"):
        return [optimizer.sub_group_to_group_id[i] for i in range(len(optimizer.fp32_partitioned_groups_flat))]
    if _flat(optimizer):
        return list(range(len(_partitions(optimizer))))  # empty for an unsupported wrapper
    return [i for i, g in enumerate(optimizer.param_groups) for _ in g["params"]]


def group_steps(optimizer) -> list[int | None]:
    """Each parameter group's Adam step count now (None: not stepped yet), for a checkpoint. Local, no collective."""
    steps: list[int | None] = [None] * len(optimizer.param_groups)
    for (_params, flat), group in zip(_partitions(optimizer), _group_ids(optimizer), strict=True):
        state = _inner(optimizer).state.get(flat, {})
        if "step" in state:
            steps[group] = int(state["step"])
    return steps


def restore_group_steps(optimizer, steps: list[int | None]) -> None:
    """Set each partition's step count to its group's saved one after a checkpoint load: DeepSpeed's universal
    ZeRO-3 load gives every sub group the first one's count (ds_to_universal keeps no per-group step there), which
    would give fresh LoRA factors the base weights' bias correction."""
    inner = _inner(optimizer)
    for (_params, flat), group in zip(_partitions(optimizer), _group_ids(optimizer), strict=True):
        state = inner.state.get(flat, {})
        if "step" in state and group < len(steps) and steps[group] is not None:
            state["step"] = _step_value(inner, flat, steps[group]) if torch.is_tensor(state["step"]) else steps[group]


def _read(optimizer, p: torch.nn.Parameter, key: str) -> torch.Tensor:
    if not _flat(optimizer):
        return optimizer.state[p][key].detach().float().cpu().clone()
    return safe_get_full_optimizer_state(p, key).detach().float().cpu()


def _write(optimizer, p: torch.nn.Parameter, key: str, value: torch.Tensor) -> None:
    if not _flat(optimizer):
        optimizer.state[p][key].copy_(value)
    else:
        safe_set_full_optimizer_state(p, value.to("cpu" if hasattr(p, "ds_id") else p.device), key)


def _names(engine) -> dict[int, str]:
    return {id(p): canonical_name(n) for n, p in engine.module.named_parameters()}


def gather(engine, keep: Callable[[str], bool] | None = None, owner: dict[str, int] | None = None) -> Moments:
    """Every trainable parameter's Adam moments (whole, fp32, CPU) with its step count, by canonical name;
    partitions that have not stepped yet are left out; with `keep`, only the names it accepts (the same on every
    rank: a rebuild into `lora` reads the few it carries, not two whole fp32 copies of the base). With `owner`
    (name -> rank, `stream.owners`), a rank keeps the tensors of the names it owns and None for the others, so
    the ranks hold one copy between them (`write` takes each from its owner). Collective: every rank calls it,
    in the same order."""
    optimizer, names = engine.optimizer, _names(engine)
    if not supported(optimizer):
        import warnings

        warnings.warn(f"{type(optimizer).__name__}: its Adam state cannot be carried across the rebuild; the new "
                      "engine starts with a fresh optimizer (use ZeRO stage 1, 2 or 3)", stacklevel=2)
        return {}
    link_state(optimizer)
    out: Moments = {}
    rank = collectives.rank() if owner is not None else None
    for params, flat in _partitions(optimizer):
        state = _inner(optimizer).state.get(flat, {})
        if "step" not in state:
            continue
        # sorted: each read is a collective, and the state's key order differs by rank after a universal load
        # (DeepSpeed adds the keys in the os.listdir order of the first parameter folder the rank owns)
        keys = sorted(k for k, v in state.items() if torch.is_tensor(v) and v.shape == flat.shape)
        for p in params:
            name = names[id(p)]
            if keep is None or keep(name):
                values = {k: _read(optimizer, p, k) for k in keys}  # every rank reads: collective under ZeRO-1/2
                out[name] = (int(state["step"]), values if owner is None or owner[name] == rank else
                             dict.fromkeys(keys))  # fmt: skip
    return out


def free(engine) -> None:
    """Release the old optimizer's Adam moments once `gather` has read them (their storage: the parameters' fragment
    views point into it), so a rebuild never holds them beside the values it gathers next: under ZeRO-3 in `full`
    they are half of what a rank holds. The engine cannot step afterwards."""
    optimizer = engine.optimizer
    for params, flat in _partitions(optimizer):
        state = _inner(optimizer).state.get(flat, {})
        for key, value in list(state.items()):
            if torch.is_tensor(value) and value.shape == flat.shape and value.data_ptr() != flat.data_ptr():
                try:
                    value.untyped_storage().resize_(0)
                except RuntimeError:  # a storage a checkpoint load handed over as not resizable: drop every reference
                    state[key] = None
                    for p in params:
                        if getattr(p, "_hp_mapping", None) is not None:
                            p._hp_mapping.optim_fragment = {}  # views into the state (link_state)


def _step_value(inner: torch.optim.Optimizer, flat: torch.Tensor, count: int):
    """A step count in the form the optimizer keeps: torch's Adam a float tensor (on the device when capturable
    or fused), DeepSpeed's FusedAdam and DeepSpeedCPUAdam a Python int."""
    if not type(inner).__module__.startswith("torch.optim"):
        return count
    on_device = inner.defaults.get("capturable") or inner.defaults.get("fused")
    return torch.tensor(float(count), dtype=torch.float32, device=flat.device if on_device else "cpu")


def write(engine, moments: Moments, owner: dict[str, int] | None = None) -> list[str]:
    """Give the new engine's optimizer the carried moments and step counts, before its first step. Returns the
    names that were carried. `owner`: the names whose tensors one rank holds (`gather(owner=...)`), broadcast from it
    here; the others every rank holds. Collective (each rank copies its own slice of the whole values)."""
    optimizer, names = engine.optimizer, _names(engine)
    inner, carried = _inner(optimizer), []
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
    link_state(optimizer)
    for params, _flat_tensor in _partitions(optimizer):
        for p in params:
            name = names[id(p)]
            if name not in moments:
                continue
            for key, value in moments[name][1].items():
                if owner is not None and name in owner:
                    value = stream.broadcast(value, owner[name], zero.shape(p))
                _write(optimizer, p, key, value)
                del value
            carried.append(name)
    return carried


def fresh_groups(optimizer) -> list[dict]:
    """The parameter groups whose Adam state started fresh in this engine (all of them without a split)."""
    return [g for g in optimizer.param_groups if not g.get(COUNT, 0)]


def revived_groups(optimizer) -> list[dict]:
    """The parameter groups of the parameters frozen in the previous phase that train again in this engine."""
    return [g for g in optimizer.param_groups if g.get(REVIVED)]
