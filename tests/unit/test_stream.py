"""The streamed rebuild's pure parts: which rank keeps which value (`stream.owners`) and the owner-local merge."""

from __future__ import annotations

import torch

from prelora_ds.engine.stream import ShardedState, module_of, owners
from prelora_ds.lora.merge import LORA_A, LORA_B, merge_lora


def vit_state(depth: int = 4, dim: int = 16, rank: int = 4) -> dict[str, torch.Tensor]:
    """The canonical names of a small ViT with LoRA on every qkv (random values, seeded)."""
    g = torch.Generator().manual_seed(0)
    state = {"cls_token": torch.randn(1, 1, dim, generator=g),
             "patch_embed.proj.weight": torch.randn(dim, 3, 4, 4, generator=g),
             "head.weight": torch.randn(10, dim, generator=g), "head.bias": torch.randn(10, generator=g)}  # fmt: skip
    for i in range(depth):
        layer = f"blocks.{i}.attn.qkv"
        state[layer + ".weight"] = torch.randn(3 * dim, dim, generator=g)
        state[layer + ".bias"] = torch.randn(3 * dim, generator=g)
        state[layer + LORA_A] = torch.randn(rank, dim, generator=g)
        state[layer + LORA_B] = torch.randn(3 * dim, rank, generator=g)
        state[f"blocks.{i}.mlp.fc1.weight"] = torch.randn(4 * dim, dim, generator=g)
    return state


def test_a_layer_has_one_owner_and_the_load_is_balanced():
    state = vit_state()
    sizes = {n: v.numel() for n, v in state.items()}
    owner = owners(sizes, 2)
    assert module_of("blocks.0.attn.qkv" + LORA_A) == module_of("blocks.0.attn.qkv.bias") == "blocks.0.attn.qkv"
    for i in range(4):  # a weight, its bias and its LoRA factors stay together: the merge is owner-local
        layer = f"blocks.{i}.attn.qkv"
        assert len({owner[layer + s] for s in (".weight", ".bias", LORA_A, LORA_B)}) == 1
    load = [sum(sizes[n] for n in sizes if owner[n] == r) for r in range(2)]
    biggest = max(sum(v for n, v in sizes.items() if module_of(n) == m) for m in map(module_of, sizes))
    assert abs(load[0] - load[1]) <= biggest, load  # greedy largest-first: within one layer of even
    assert owners(dict(reversed(list(sizes.items()))), 2) == owner  # every rank computes the same map
    assert set(owners(sizes, 1).values()) == {0}
    assert set(owners(sizes, 3).values()) == {0, 1, 2}


def test_owner_local_merges_give_the_whole_merge():
    """Each rank merges the layers it owns; together they hold exactly merge_lora of the whole state."""
    state = vit_state()
    scales = {f"blocks.{i}.attn.qkv": 0.5 + i for i in range(4)}
    whole = merge_lora(state, scales)
    shapes = {n: v.shape for n, v in state.items()}
    held = {}
    for rank in range(2):
        sharded = ShardedState.for_names(shapes, 2, rank)
        for name, value in state.items():  # the order a gather visits them; each rank keeps its own
            sharded.keep(name, value)
        merged = sharded.merged(scales)
        assert set(merged.shapes) == set(whole)  # every rank knows every merged name and shape
        assert not set(merged.local) & set(held)
        held.update(merged.local)
    assert held.keys() == whole.keys()
    assert all(torch.equal(held[n], whole[n]) for n in whole)
