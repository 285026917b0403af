"""The state a rebuild carries, streamed through it (docs/design.md §4): no rank holds a whole fp32 copy of the model
between the old engine and the new one.

Each parameter gets one owner rank (`owners`: whole layers, balanced by size). Out of the old engine every value is
gathered as before (a collective), but only its owner keeps it, so a rank holds about 1/world of the model's fp32
values, as ZeRO holds its masters. The new engine takes each parameter in turn from its owner by a broadcast on the
training group (the accelerator's device: NCCL takes CUDA tensors only), writes it, and drops it. A LoRA factor and
the weight it adds to have one owner, so a merge before a rank change is done by the owner on its own share.
"""

from __future__ import annotations

import torch

from prelora_ds.distributed import collectives
from prelora_ds.lora.merge import merge_lora


def module_of(name: str) -> str:
    """The layer a canonical parameter name belongs to: `blocks.0.attn.qkv` for its weight, bias and LoRA factors."""
    return name.split(".lora_")[0] if ".lora_" in name else name.rsplit(".", 1)[0]


def owners(sizes: dict[str, int], world: int) -> dict[str, int]:
    """name -> the rank that keeps its value: whole layers (`module_of`), largest first, each to the rank holding
    the fewest elements so far (ties: the lower rank). Pure and deterministic: every rank computes the same map
    from the same names and sizes."""
    layers: dict[str, int] = {}
    for name, size in sizes.items():
        layers[module_of(name)] = layers.get(module_of(name), 0) + size
    load = [0] * world
    layer_owner = {}
    for layer in sorted(layers, key=lambda k: (-layers[k], k)):
        rank = min(range(world), key=lambda r: (load[r], r))
        layer_owner[layer] = rank
        load[rank] += layers[layer]
    return {name: layer_owner[module_of(name)] for name in sizes}


def device() -> torch.device:
    """Where a streamed value travels: the accelerator's current device (CUDA under NCCL, CPU under gloo)."""
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def broadcast(value: torch.Tensor | None, src: int, shape: torch.Size,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:  # fmt: skip
    """`src`'s `value` on every rank (the others pass None), on the accelerator's device. Collective."""
    return collectives.broadcast_tensor(value, src, shape, device(), dtype)


class ShardedState:
    """Every parameter's exact fp32 value by canonical name, each kept by its owner rank only (on CPU).

    `shapes` and `owner` are the same on every rank; `local` holds this rank's share. `value(name)` is the whole
    value on every rank (a broadcast from the owner: collective, called by every rank in the same order)."""

    def __init__(self, shapes: dict[str, torch.Size], owner: dict[str, int] | None, rank: int) -> None:
        """`owner` None: every rank holds every value (`replicated`)."""
        self.shapes, self.owner, self.rank = shapes, owner, rank
        self.local: dict[str, torch.Tensor] = {}

    @classmethod
    def for_names(cls, shapes: dict[str, torch.Size], world: int, rank: int) -> ShardedState:
        return cls(shapes, owners({n: s.numel() for n, s in shapes.items()}, world), rank)

    @classmethod
    def replicated(cls, state: dict[str, torch.Tensor]) -> ShardedState:
        """A whole state every rank already holds (no broadcasts)."""
        out = cls({n: v.shape for n, v in state.items()}, None, 0)
        out.local = dict(state)
        return out

    def __contains__(self, name: str) -> bool:
        return name in self.shapes

    def names(self) -> list[str]:
        return list(self.shapes)

    def mine(self, name: str) -> bool:
        return self.owner is None or self.owner[name] == self.rank

    def src(self, name: str) -> int | None:
        """The rank a value comes from (None: every rank has it)."""
        return None if self.owner is None else self.owner[name]

    def keep(self, name: str, value: torch.Tensor) -> None:
        """Keep `value` if this rank owns `name` (every rank passes it: it was gathered collectively)."""
        if self.mine(name):
            self.local[name] = value.detach().float().cpu()

    def value(self, name: str) -> torch.Tensor:
        """The whole fp32 value of `name` on every rank, on the accelerator's device. Collective (sharded)."""
        if self.owner is None:
            return self.local[name].to(device())
        return broadcast(self.local.get(name), self.owner[name], self.shapes[name])

    def merged(self, scales: dict[str, float]) -> ShardedState:
        """W + s B A for every LoRA layer in `scales`, the factors dropped (`lora.merge.merge_lora`), each owner on
        its own layers: a factor and its weight share an owner. Local, no collective."""
        names = {n: s for n, s in self.shapes.items() if ".lora_" not in n}
        out = ShardedState(names, None if self.owner is None else {n: self.owner[n] for n in names}, self.rank)
        mine = {layer: s for layer, s in scales.items() if self.mine(layer + ".weight")}
        out.local = merge_lora(self.local, mine)
        return out

    def local_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.local.values())
