"""ReLoRA's merge-and-reinitialise under ZeRO-1/2/3 (paper §4.2.4; docs/design.md), done in place.

Under ZeRO-2 `optimizer.state[p]` is keyed by flat partitions, so editing it per parameter does
nothing. Every write here goes through DeepSpeed's fragment API (`safe_get/set_full_fp32_param`,
`safe_get/set_full_optimizer_state`), which reads and writes each rank's partition; every rank must
call these functions in the same order (they are collectives). Under bf16 the merged base lives in the
kept fp32 copy of the frozen weights, so nothing is lost to rounding; an fp32 module is merged in place.
"""

from __future__ import annotations

import math

import torch
from deepspeed.utils import safe_get_full_optimizer_state, safe_set_full_optimizer_state

from prelora_ds.engine import zero
from prelora_ds.lora.inject import canonical_name

ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def _lora_layers(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    inner = module.base_model.model
    return {n: m for n, m in inner.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


def merge_and_reinit(
    module: torch.nn.Module, frozen_fp32: dict[str, torch.Tensor], seed: int, merge_index: int
) -> dict[str, float]:
    """W += (alpha/r) B A in fp32 for every LoRA layer, then A ~ kaiming-uniform (as PEFT), B = 0.

    A is drawn from a generator seeded by (seed, merge_index, layer), so every rank draws the same.
    Returns {layer: ||s B A||} of the merged deltas.
    """
    deltas = {}
    for i, (name, layer) in enumerate(_lora_layers(module).items()):
        a_p, b_p = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        a, b = zero.full_value(a_p), zero.full_value(b_p)  # the fp32 masters, gathered under ZeRO-3
        delta = layer.scaling["default"] * (b @ a)
        key, weight = f"{name}.weight", layer.base_layer.weight
        kept = frozen_fp32.get(key)  # the exact base under bf16/fp16; an fp32 module is exact itself
        merged = (kept if kept is not None else zero.full_value(weight)) + delta
        if kept is not None:
            frozen_fp32[key] = merged
        zero.write_module_value(weight, merged)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + merge_index * 10_007 + i)
        new_a = torch.empty_like(a)
        torch.nn.init.kaiming_uniform_(new_a, a=math.sqrt(5), generator=gen)
        zero.write_master(a_p, new_a)
        zero.write_master(b_p, torch.zeros_like(b))
        deltas[name] = float(delta.norm())
    return deltas


def prune_optimizer_state(module: torch.nn.Module, ratio: float, full_reset: bool) -> float:
    """Reset the Adam first moment of every LoRA parameter; returns the share of first-moment entries zeroed.

    `exp_avg` (the direction Adam remembers) is magnitude-pruned: its `ratio` smallest entries are zeroed
    (all of them with `full_reset` or `ratio >= 1`). `exp_avg_sq` (the per-entry step scale) is kept. A
    zeroed second moment under a surviving first moment makes Adam's next update `m / eps`: right after a
    merge B = 0, so A's gradient is exactly 0 and nothing refills v (measured on the demo: A's first update
    3400x the last pre-merge one). A zeroed pair is not safe either: the ZeRO-2 flat partition keeps one
    `step` for all its entries, so the zeroed pair gets no fresh bias correction and steps up to 2-6x a
    normal update for hundreds of steps. With v kept, every post-merge update is at most what the same m
    gives with v zeroed, and the pruned entries restart at (1 - beta1) g / sqrt(v). docs/relora.md.

    Call `moments.link_state(engine.optimizer)` first.
    """
    zeroed = total = 0
    for name, p in module.named_parameters():
        if ".lora_" not in name or not p.requires_grad:
            continue
        state = safe_get_full_optimizer_state(p, "exp_avg")
        if state is None:  # no step taken yet: nothing to prune
            continue
        state = state.float()
        if full_reset or ratio >= 1.0:
            pruned = torch.zeros_like(state)
        else:
            k = int(ratio * state.numel())
            pruned = state.clone()
            if k > 0:
                cut = state.abs().flatten().kthvalue(k).values
                pruned[state.abs() <= cut] = 0.0
        safe_set_full_optimizer_state(p, pruned, "exp_avg")
        zeroed += int((pruned == 0).sum())
        total += pruned.numel()
    return zeroed / total if total else 0.0


def validate_rank(module: torch.nn.Module, layers: list[str], rank: int) -> None:
    """A uniform ReLoRA rank must not exceed any target layer's smaller dimension."""
    from prelora_ds.errors import ConfigError

    for name in layers:
        layer = module.get_submodule(canonical_name(name))
        smallest = min(layer.in_features, layer.out_features)
        if rank > smallest:
            raise ConfigError(
                f"relora.rank={rank} exceeds the smaller dimension ({smallest}) of {name} "
                f"({layer.in_features} -> {layer.out_features}); use relora.rank <= {smallest}."
            )
