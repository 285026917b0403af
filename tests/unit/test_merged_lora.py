"""`prelora.lora_layer: merged` computes PEFT's LoRA layer: the same outputs and every gradient.

Exact where the arithmetic allows it: with small integer tensors (every product and sum an exact integer in fp32, and
in bf16 below 256) the two layers must agree bit for bit in fp32 and in bf16, for the base frozen (`lora`) and
trainable (`warmup`). On a whole ViT with random weights they are compared in float64 (where only the order of a
sum differs). ZeRO-2/3 engines run the same check in tests/scripts/zero_stages.py (test_zero_stages.py).
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import Linear as LoraLinear

from prelora_ds.config.sections import PreLoRAConfig
from prelora_ds.lora import merged
from prelora_ds.lora.inject import PHASES, inject_lora, set_trainable


class Two(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 12)
        self.fc2 = torch.nn.Linear(12, 6, bias=False)

    def forward(self, x):
        return self.fc2(self.fc1(x))


def integer_pair(dtype: torch.dtype, dropout: float = 0.0) -> dict[str, torch.nn.Module]:
    """PEFT's layer and the merged one on the same integer weights in {-1, 0, 1} (B too: not PEFT's zero init)."""
    gen = torch.Generator().manual_seed(0)
    base = Two()
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(torch.randint(-1, 2, p.shape, generator=gen))
    out = {}
    for kind in ("peft", "merged"):
        cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"], lora_dropout=dropout)  # scale 2: exact
        if kind == "merged":
            merged.register(cfg)
        model = get_peft_model(copy.deepcopy(base), cfg).to(dtype)
        out[kind] = model
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for (name, p), (_, q) in zip(out["peft"].named_parameters(), out["merged"].named_parameters(), strict=True):
            if ".lora_" in name:
                p.copy_(torch.randint(-1, 2, p.shape, generator=gen))
                q.copy_(p)
    return out


def forward_backward(model, x, gout, base_trainable: bool):
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name or base_trainable)
        p.grad = None
    x = x.clone().requires_grad_(True)
    y = model(x)
    (y * gout).sum().backward()
    return y.detach(), x.grad, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("phase", ["lora", "warmup"])
def test_merged_layer_equals_peft_bit_for_bit_on_exact_arithmetic(dtype, phase):
    models = integer_pair(dtype)
    assert isinstance(models["merged"].base_model.model.fc1, merged.MergedLinear)
    assert type(models["peft"].base_model.model.fc1) is LoraLinear
    gen = torch.Generator().manual_seed(2)
    x = torch.randint(-1, 2, (3, 5, 8), generator=gen).to(dtype)
    gout = torch.randint(-1, 2, (3, 5, 6), generator=gen).to(dtype)
    want = forward_backward(models["peft"], x, gout, phase == "warmup")
    got = forward_backward(models["merged"], x, gout, phase == "warmup")
    assert want[0].abs().max() > 0 and torch.equal(got[0], want[0])
    assert torch.equal(got[1], want[1])  # the input gradient
    assert got[2].keys() == want[2].keys()
    assert any(".base_layer." in n for n in want[2]) == (phase == "warmup")
    for name in want[2]:
        assert want[2][name].abs().max() > 0, name  # a zero gradient would compare equal for any formula
        assert torch.equal(got[2][name], want[2][name]), name


def vit_pair(kind_cfg: dict) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    base = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=2, num_classes=10).double()
    ranks = {f"blocks.{i}.{k}": r for i in range(2)
             for k, r in (("attn.qkv", 4), ("attn.proj", 8), ("mlp.fc1", 2), ("mlp.fc2", 16))}  # fmt: skip
    out = {}
    for kind in ("peft", "merged"):
        torch.manual_seed(1)  # the same A init on both
        model = inject_lora(copy.deepcopy(base), ranks, PreLoRAConfig(lora_layer=kind, **kind_cfg))
        torch.manual_seed(2)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:  # PEFT starts B at zero: the LoRA path's forward and A's gradient would vanish
                    p.normal_(std=0.05)
        out[kind] = model
    return out


@pytest.mark.parametrize("phase", ["warmup", "lora"])
def test_merged_vit_equals_peft_in_outputs_and_every_gradient(phase):
    models = vit_pair({})
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    results = {}
    for kind, model in models.items():
        set_trainable(model, PHASES[phase], PreLoRAConfig().trainable_extra)
        model.zero_grad(set_to_none=True)
        y = model(x)
        torch.nn.functional.cross_entropy(y, torch.arange(4)).backward()
        results[kind] = y.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    (y0, g0), (y1, g1) = results["peft"], results["merged"]
    assert torch.allclose(y1, y0, rtol=0, atol=1e-12)
    assert g1.keys() == g0.keys() and sum(".lora_A." in n for n in g0) == 8
    for name in g0:  # float64: the two orders of summation differ by ~1e-16 relative
        assert torch.allclose(g1[name], g0[name], rtol=1e-9, atol=1e-13), name


def test_merged_layer_falls_back_to_peft_where_it_is_not_the_same_function():
    """Dropout on the LoRA input in training is not `x (W + sBA)^T`: PEFT's own path runs (same RNG, same result);
    in eval the dropout is the identity and the merged path runs again."""
    models = integer_pair(torch.float32, dropout=0.5)
    x = torch.randint(-1, 2, (4, 8), generator=torch.Generator().manual_seed(4)).float()
    layer = models["merged"].base_model.model.fc1
    assert layer._merged_path(x, (), {}) is None
    outs = []
    for model in models.values():
        torch.manual_seed(5)
        outs.append(model(x))
    assert torch.equal(outs[0], outs[1])
    models["merged"].eval()
    assert layer._merged_path(x, (), {}) == "default"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer._merged_path(x, (), {}) is None
    with models["merged"].disable_adapter():
        assert torch.equal(models["merged"](x), models["merged"].get_base_model()(x))


def test_peft_still_merges_and_unloads_the_merged_layer():
    """merge_and_unload (the package's export) gives a plain model with the same function."""
    models = integer_pair(torch.float32)
    x = torch.randint(-1, 2, (4, 8), generator=torch.Generator().manual_seed(6)).float()
    with torch.no_grad():
        want = models["merged"](x)
        plain = models["merged"].merge_and_unload()
        assert type(plain.fc1) is torch.nn.Linear
        assert torch.equal(plain(x), want)


def saved_bytes(model, x) -> int:
    """Bytes of the distinct storages autograd keeps for backward in one forward."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    return sum(seen.values())


def test_merged_layer_keeps_less_for_backward_than_peft():
    """PEFT keeps x A^T (tokens x r) per layer besides what the base keeps; the merged layer keeps x only."""
    models = vit_pair({})
    for model in models.values():
        set_trainable(model, PHASES["lora"], PreLoRAConfig().trainable_extra)
    x = torch.randn(8, 3, 16, 16, dtype=torch.float64)
    peft_bytes, merged_bytes = (saved_bytes(models[k], x) for k in ("peft", "merged"))
    tokens = 8 * 17
    assert peft_bytes - merged_bytes >= tokens * 2 * (4 + 8 + 2 + 16) * 8  # x A^T of every layer, float64


def test_zero3_leaf_flag_is_set_on_merged_layers_only():
    models = vit_pair({})
    leaves = [n for n, m in models["merged"].named_modules() if getattr(m, "_z3_leaf", False)]
    assert len(leaves) == 8 and all(n.endswith(("qkv", "proj", "fc1", "fc2")) for n in leaves)
    assert not any(getattr(m, "_z3_leaf", False) for m in models["peft"].modules())
