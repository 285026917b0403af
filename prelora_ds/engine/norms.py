"""Per-layer weight-norm statistics for the partial convergence test, all-reduced across ranks.

Each rank sums the squares of the fp32 values it owns (its ZeRO partition fragment of the masters under
ZeRO-1/2/3; a frozen weight's partition under ZeRO-3; the kept fp32 copy of frozen weights on rank 0
only) and one all-reduce SUM of a vector gives every rank the same exact norms. The training loss rides in
the same all-reduce, so a sample costs one collective (`distributed.collectives`, on CPU tensors) and one
device-to-host copy per device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from prelora_ds.distributed import collectives
from prelora_ds.engine import zero
from prelora_ds.lora.inject import canonical_name, layer_index, module_key


@dataclass
class NormLayout:
    """Target layers grouped by module key (`attn.qkv`, ...) in layer order: norm_windows[m][k][l]."""

    modules: dict[str, list[str]]

    @classmethod
    def from_layers(cls, layers: list[str]) -> NormLayout:
        modules: dict[str, list[str]] = {}
        for name in sorted(layers, key=layer_index):
            modules.setdefault(module_key(name), []).append(name)
        counts = {k: len(v) for k, v in modules.items()}
        if len(set(counts.values())) > 1:
            raise ValueError(f"target modules have different layer counts {counts}; the test needs one per layer")
        return cls(modules)

    @property
    def layers(self) -> list[str]:
        return [n for names in self.modules.values() for n in names]

    def split(self, flat: list[float]) -> dict[str, list[float]]:
        out, i = {}, 0
        for key, names in self.modules.items():
            out[key] = flat[i : i + len(names)]
            i += len(names)
        return out


def _local_fp32_fragment(p: torch.nn.Parameter) -> torch.Tensor | None:
    """This rank's fp32 master fragment of `p`: empty if it owns none, None if `p` has no ZeRO master."""
    if hasattr(p, "ds_id"):  # ZeRO-3
        from deepspeed.utils import safe_get_local_fp32_param

        return safe_get_local_fp32_param(p)
    if hasattr(p, "_hp_mapping"):  # ZeRO-1/2 and the bf16 optimizer
        mapping = p._hp_mapping
        return mapping.get_hp_fragment() if mapping is not None else p.new_empty(0, dtype=torch.float32)
    return None


def _sumsq(t: torch.Tensor) -> torch.Tensor:
    """sum(t^2) in fp32 as a 0-dim tensor on t's device (read later, all at once: no host sync per layer)."""
    t = t.detach().float().flatten()
    return torch.dot(t, t) if t.numel() else t.new_zeros(())


def _to_floats(values: list[torch.Tensor | float]) -> list[float]:
    """Python floats of 0-dim tensors on any devices: one stacked copy to the host per device."""
    out: list[float] = [v if isinstance(v, float) else 0.0 for v in values]
    by_device: dict[torch.device, list[int]] = {}
    for i, v in enumerate(values):
        if isinstance(v, torch.Tensor):
            by_device.setdefault(v.device, []).append(i)
    for idx in by_device.values():
        for i, x in zip(idx, torch.stack([values[i] for i in idx]).double().cpu().tolist(), strict=True):
            out[i] = x
    return out


def weight_sumsq(
    module: torch.nn.Module, layers: list[str], frozen_fp32: dict[str, torch.Tensor], rank: int
) -> list[float]:
    """This rank's share of sum(W^2) for each target layer's weight (to be all-reduced with SUM)."""
    params = {canonical_name(n): p for n, p in module.named_parameters()}
    out: list[torch.Tensor | float] = []
    for layer in layers:
        key = f"{layer}.weight"
        p = params[key]
        frag = _local_fp32_fragment(p) if p.requires_grad else None
        if frag is not None:
            out.append(_sumsq(frag))
        elif zero.is_zero3(p) and key not in frozen_fp32:  # frozen, partitioned: each rank its slice
            out.append(zero.local_sumsq(p))
        elif rank == 0:  # frozen or not ZeRO-managed: full value on every rank, counted once
            out.append(_sumsq(frozen_fp32.get(key, p)))
        else:
            out.append(0.0)
    return _to_floats(out)


def lora_sumsq(
    module: torch.nn.Module, layers: list[str], frozen_fp32: dict[str, torch.Tensor], rank: int, world: int
) -> list[float]:
    """This rank's share of [||W||^2, ||s B A||^2, ||W + s B A||^2] per LoRA layer, flattened.

    Layers are dealt round-robin over ranks; W is the fp32 base (kept copy when frozen), B and A the
    module's working copies, copied to the CPU (once per window after the switch: monitoring only).
    Under ZeRO-3 the module's copies are partitions: every rank gathers every layer (collectives, in the same
    order on all ranks) and computes its own share.
    """
    out: list[torch.Tensor | float] = []
    for i, layer in enumerate(layers):
        mod = _get(module, layer)
        a_p, b_p, w_p = mod.lora_A["default"].weight, mod.lora_B["default"].weight, mod.base_layer.weight
        partitioned = zero.is_zero3(a_p)
        if i % world != rank and not partitioned:
            out.extend((0.0, 0.0, 0.0))
            continue
        base = frozen_fp32.get(f"{layer}.weight")
        if base is None:
            base = zero.full_value(w_p) if partitioned else w_p.detach().float().cpu()
        if partitioned:
            a, b = zero.full_value(a_p), zero.full_value(b_p)
        else:
            a, b = a_p.detach().float().cpu(), b_p.detach().float().cpu()
        if i % world != rank:
            out.extend((0.0, 0.0, 0.0))
            continue
        delta = mod.scaling["default"] * (b @ a)
        out.extend((_sumsq(base), _sumsq(delta), _sumsq(base + delta)))
    return _to_floats(out)


def _get(module: torch.nn.Module, layer: str) -> torch.nn.Module:
    inner = getattr(getattr(module, "base_model", None), "model", module)
    return inner.get_submodule(layer)


def sample(
    module: torch.nn.Module,
    layout: NormLayout,
    frozen_fp32: dict[str, torch.Tensor],
    rank: int,
    loss_sum: float,
    loss_count: float,
) -> tuple[dict[str, list[float]], float, float]:
    """One all-reduced sample: (norms[module][layer], global loss sum, global sample count)."""
    local = weight_sumsq(module, layout.layers, frozen_fp32, rank) + [loss_sum, loss_count]
    total = collectives.all_reduce_sum(local)
    norms = [math.sqrt(max(v, 0.0)) for v in total[:-2]]
    return layout.split(norms), total[-2], total[-1]


def lora_norms(
    module: torch.nn.Module,
    layout: NormLayout,
    frozen_fp32: dict[str, torch.Tensor],
    rank: int,
    world: int,
    loss_sum: float = 0.0,
    loss_count: float = 0.0,
) -> tuple[dict[str, dict[str, float]], float, float]:
    """({layer: {base, lora, effective}} Frobenius norms, global loss sum, global count), one all-reduce.

    The effective norms ||W + s B A|| feed the convergence test during `relora`.
    """
    layers = layout.layers
    total = collectives.all_reduce_sum(lora_sumsq(module, layers, frozen_fp32, rank, world) + [loss_sum, loss_count])
    values = {
        layer: {k: math.sqrt(max(total[3 * i + j], 0.0)) for j, k in enumerate(("base", "lora", "effective"))}
        for i, layer in enumerate(layers)
    }
    return values, total[-2], total[-1]


def effective_by_module(layout: NormLayout, values: dict[str, dict[str, float]]) -> dict[str, list[float]]:
    return {m: [values[n]["effective"] for n in names] for m, names in layout.modules.items()}
