"""Phase structures on a tiny timm ViT, in-process: LoRA injection, trainable sets, names, export."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

from prelora_ds.config.sections import PreLoRAConfig
from prelora_ds.engine.model import param_groups
from prelora_ds.errors import ConfigError
from prelora_ds.lora.inject import PHASES, build_structure, canonical_name, inject_lora, module_key, target_layers
from prelora_ds.lora.merge import lora_scales, merge_lora

CFG = PreLoRAConfig()


def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=16, patch_size=4, depth=3)


def ranks_for(model) -> dict[str, int]:
    return {n: 8 * 2 ** (i % 4) for i, n in enumerate(target_layers(model, CFG.target_modules))}


def test_targets_are_block_linears_never_patch_embed():
    layers = target_layers(tiny(), CFG.target_modules)
    assert len(layers) == 12 and "patch_embed.proj" not in layers
    assert {module_key(n) for n in layers} == {"attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"}


def test_target_regex_matching_nothing_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"matches no Linear module.*blocks"):
        target_layers(tiny(), r"encoder\.layer\.\d+\.query")


def test_inject_lora_gives_every_layer_its_rank_and_scale():
    model = tiny()
    ranks = ranks_for(model)
    peft_model = inject_lora(model, ranks, CFG)
    inner = peft_model.base_model.model
    for name, r in ranks.items():
        layer = inner.get_submodule(name)
        assert layer.lora_A["default"].out_features == r and layer.lora_B["default"].in_features == r
        assert layer.scaling["default"] == CFG.alpha_ratio
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0  # B = 0: function unchanged
    assert not hasattr(inner.patch_embed.proj, "lora_A")


def test_canonical_names_map_peft_to_timm():
    model = tiny()
    timm_names = {n for n, _ in model.named_parameters()}
    peft_model = inject_lora(model, ranks_for(model), CFG)
    canon = {canonical_name(n) for n, _ in peft_model.named_parameters() if ".lora_" not in n}
    assert canon == timm_names


@pytest.mark.parametrize("phase", ["full", "warmup", "lora", "relora"])
def test_trainable_set_per_phase(phase):
    model = tiny()
    spec = PHASES[phase]
    out = build_structure(model, spec, ranks_for(model) if spec.has_lora else None, CFG)
    trainable = {canonical_name(n) for n, p in out.named_parameters() if p.requires_grad}
    every = {canonical_name(n) for n, _ in out.named_parameters()}
    if spec.base_trainable:
        assert trainable == every
    else:
        base = {n for n in trainable if ".lora_" not in n}
        assert base and all(n.startswith(("head.", "norm.")) or ".norm" in n for n in base), base
        assert "blocks.0.attn.qkv.weight" not in trainable and "pos_embed" not in trainable
        assert any(".lora_A." in n for n in trainable)


def test_weight_decay_only_on_weight_matrices():
    model = tiny()
    groups = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert "blocks.0.attn.qkv.weight" in decay and "head.weight" in decay
    for n in ("pos_embed", "cls_token", "blocks.0.attn.qkv.bias", "blocks.0.norm1.weight", "norm.weight"):
        assert n in no_decay


def test_export_merge_equals_peft_merge_and_unload():
    model = tiny()
    peft_model = inject_lora(model, ranks_for(model), CFG)
    with torch.no_grad():  # give B a value so the merge has something to do
        for n, p in peft_model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.02)
    state = {canonical_name(n): p.detach().clone() for n, p in peft_model.named_parameters()}
    ours = merge_lora(state, lora_scales(peft_model))
    reference = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    assert set(ours) == set(reference)
    worst = max(float((ours[k] - reference[k]).abs().max()) for k in ours)
    assert worst < 1e-6
    plain = tiny()
    plain.load_state_dict(ours)  # strict: loadable into a plain timm model
    x = torch.randn(2, 3, 16, 16)
    peft_model.eval()
    plain.eval()
    assert torch.allclose(plain(x), peft_model(x), atol=1e-5)
