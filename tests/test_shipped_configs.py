"""Every shipped recipe, DeepSpeed config and hostfile loads and validates at the world size it is for."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from conftest import ROOT
from deepspeed.launcher.runner import fetch_hostfile

from prelora_ds.config import load_recipe
from prelora_ds.dsconfig import load_ds_config, prepare_ds_config
from prelora_ds.phases import target_layers

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
DS_CONFIGS = sorted((ROOT / "ds_configs").glob("*.json"))


def world_of(ds_path) -> list[int]:
    return [64] if "a100_64" in ds_path.name or "offload" in ds_path.name else [1, 2]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_validates_with_its_ds_config(recipe):
    overrides = {"data.root": "/datasets/imagenet"} if "vit_l" in recipe.stem else {}
    cfg = load_recipe(recipe, overrides)
    ds_path = ROOT / cfg.train.deepspeed_config
    for world in world_of(ds_path):
        ds = prepare_ds_config(load_ds_config(ds_path), world)
        assert ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world == ds[
            "train_batch_size"
        ]
    if "vit_l" in recipe.stem:
        assert cfg.train.output_dir == f"runs/{recipe.stem}"
        assert prepare_ds_config(load_ds_config(ds_path), 64)["train_batch_size"] == 4096


def test_vit_l_threshold_strictness_is_ordered():
    exps = [load_recipe(ROOT / f"recipes/vit_l_exp{i}.yaml", {"data.root": "x"}).prelora for i in (1, 2, 3)]
    assert exps[0].delta_w > exps[1].delta_w > exps[2].delta_w
    assert exps[0].delta_l > exps[1].delta_l > exps[2].delta_l
    warm = [load_recipe(ROOT / f"recipes/vit_l_warmup{w}.yaml", {"data.root": "x"}).prelora for w in (5, 10, 15)]
    assert [w.warmup_epochs for w in warm] == [5, 10, 15]


@pytest.mark.parametrize("ds_path", DS_CONFIGS, ids=lambda p: p.stem)
def test_ds_config_is_explicit(ds_path):
    raw = json.loads(ds_path.read_text())
    assert "gradient_clipping" in raw
    for world in world_of(ds_path):
        prepare_ds_config(raw, world)
    if ds_path.name.startswith("cpu_"):
        assert raw["optimizer"]["params"]["torch_adam"] is True  # no FusedAdam JIT build on CPU
        assert not raw.get("fp16", {}).get("enabled")
    assert raw["zero_optimization"]["stage"] == 2


def test_vit_l_targets_and_lora_share():
    """ViT-L/16 (built on the meta device): 96 target layers, none in patch_embed; LoRA <= 10% of params."""
    cfg = load_recipe(ROOT / "recipes/vit_l_exp2.yaml", {"data.root": "x"})
    with torch.device("meta"):
        model = timm.create_model(cfg.model.name, num_classes=1000)
    layers = target_layers(model, cfg.prelora.target_modules)
    assert len(layers) == 96 and not any("patch_embed" in n for n in layers)
    total = sum(p.numel() for p in model.parameters())
    r = cfg.prelora.r_max  # the worst case: every layer at r_max
    lora = sum(r * (model.get_submodule(n).in_features + model.get_submodule(n).out_features) for n in layers)
    assert lora / total <= 0.10, lora / total


@pytest.mark.parametrize("name,hosts,slots", [("localhost", 1, 2), ("a100_16x4", 16, 4)])
def test_hostfiles_parse_with_deepspeed(name, hosts, slots):
    pool = fetch_hostfile(str(ROOT / "hostfiles" / name))
    assert len(pool) == hosts and set(pool.values()) == {slots}
