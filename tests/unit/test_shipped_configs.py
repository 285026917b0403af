"""Every shipped recipe, DeepSpeed config and hostfile loads and validates at the world size it is for."""

from __future__ import annotations

import json

import pytest
import torch
from deepspeed.launcher.runner import fetch_hostfile

from prelora_ds.config.deepspeed import load_ds_config, prepare_ds_config
from prelora_ds.config.recipe import load_recipe
from prelora_ds.engine.model import create_model
from prelora_ds.lora.inject import PHASES, build_structure, target_layers
from prelora_ds.testing.harness import REPO

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
DS_CONFIGS = sorted((REPO / "ds_configs").glob("*.json"))


def world_of(ds_path) -> list[int]:
    return [64] if "a100_64" in ds_path.name or "offload" in ds_path.name else [1, 2]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_validates_with_its_ds_config(recipe):
    overrides = {"data.root": "/datasets/imagenet"} if recipe.stem.startswith(("vit_l", "vit_h")) else {}
    cfg = load_recipe(recipe, overrides)
    ds_path = REPO / cfg.train.deepspeed_config
    for world in world_of(ds_path):
        ds = prepare_ds_config(load_ds_config(ds_path), world)
        assert ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world == ds[
            "train_batch_size"
        ]
    if recipe.stem.startswith(("vit_l", "vit_h")):
        assert cfg.train.output_dir == f"runs/{recipe.stem}"
        assert prepare_ds_config(load_ds_config(ds_path), 64)["train_batch_size"] == 4096


def test_vit_l_threshold_strictness_is_ordered():
    exps = [load_recipe(REPO / f"recipes/vit_l_exp{i}.yaml", {"data.root": "x"}).prelora for i in (1, 2, 3)]
    assert exps[0].delta_w > exps[1].delta_w > exps[2].delta_w
    assert exps[0].delta_l > exps[1].delta_l > exps[2].delta_l
    warm = [load_recipe(REPO / f"recipes/vit_l_warmup{w}.yaml", {"data.root": "x"}).prelora for w in (5, 10, 15)]
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
    # stage 3 for the model that needs it (ViT-H/14) and the CPU check of it; stage 2 everywhere else
    assert raw["zero_optimization"]["stage"] == (3 if "zero3" in ds_path.name else 2)


def vit_l_structure(recipe: str = "vit_l_exp2"):
    """The recipe's ViT-L/16 (split q/k/v) on the meta device (no weights) and its target layers."""
    cfg = load_recipe(REPO / f"recipes/{recipe}.yaml", {"data.root": "x"})
    with torch.device("meta"):
        model = create_model(cfg.model, 1000)
    return cfg, model, target_layers(model, cfg.prelora.target_modules)


@pytest.mark.parametrize("recipe", [r.stem for r in RECIPES if r.stem.startswith("vit_l")])
def test_vit_l_recipes_are_the_papers_structure(recipe):
    """Separate q, k, v plus attn.proj, fc1, fc2 in each of the 24 blocks; never patch_embed; eval crop 0.875."""
    cfg, model, layers = vit_l_structure(recipe)
    assert cfg.model.qkv == "split" and cfg.data.crop_pct == 0.875
    kinds = {n.split(".", 2)[2] for n in layers}
    assert kinds == {"attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.proj", "mlp.fc1", "mlp.fc2"}
    assert len(layers) == 24 * 6 and not any("patch_embed" in n for n in layers)


def test_vit_l_lora_parameters_match_the_papers_count(capsys):
    """The paper: ReLoRA at rank 256 trains 114M parameters; 24 x 256 x 18,432 = 113,246,208 only with separate
    q, k, v. Counted on PEFT's injection (the package's own path), on the meta device."""
    cfg, model, layers = vit_l_structure("vit_l_relora")
    total = sum(p.numel() for p in model.parameters())
    relora = build_structure(model, PHASES["relora"], {n: cfg.relora.rank for n in layers}, cfg.prelora)
    lora = sum(p.numel() for n, p in relora.named_parameters() if ".lora_" in n)
    assert cfg.relora.rank == 256 and lora == 24 * 256 * 18_432 == 113_246_208
    shares = {}
    for r in (cfg.prelora.r_min, cfg.prelora.r_max):  # after the switch every layer is at 8..64
        shares[r] = r * 18_432 * 24 / total
    print(f"ViT-L/16 {total:,} parameters; LoRA share after the switch: {100 * shares[8]:.1f} % (all rank 8) to "
          f"{100 * shares[64]:.1f} % (all rank 64); the paper: about 10 %")
    assert 0.011 < shares[8] < 0.012 and 0.092 < shares[64] < 0.094


@pytest.mark.parametrize("name,hosts,slots", [("localhost", 1, 2), ("a100_16x4", 16, 4)])
def test_hostfiles_parse_with_deepspeed(name, hosts, slots):
    pool = fetch_hostfile(str(REPO / "hostfiles" / name))
    assert len(pool) == hosts and set(pool.values()) == {slots}


def test_every_study_arm_validates():
    """`tools/run_study.py`'s arms parse and validate as the trainer's own flags (a typo would stop a study minutes
    in); the no-switch control never passes the test, and keeps relora on."""
    import importlib.util

    from prelora_ds import train

    spec = importlib.util.spec_from_file_location("run_study", REPO / "tools" / "run_study.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    cfgs = {}
    for name, flags in study.CONFIGS.items():
        args, overrides = train.parse_args(["--recipe", "recipes/demo.yaml", "--output_dir", "x", *flags])
        cfgs[name] = load_recipe(REPO / args.recipe, overrides)
    for control, hybrid in (("relora_noswitch", "relora_r16"), ("relora_noswitch_r48", "relora")):
        control, hybrid = cfgs[control], cfgs[hybrid]
        assert control.relora.enabled and control.relora.rank == hybrid.relora.rank
        assert control.prelora.delta_w < 1e-6 and control.prelora.delta_l < 1e-6
    # the rank-16 arms are the recipe the earlier sections of docs/study.md ran, whatever the recipe says now
    r16 = [cfgs[n].relora for n in ("relora_r16", "relora_base_lr10", "relora_base_lr01", "relora_noswitch")]
    assert {r.rank for r in r16} == {16}
    assert [(r.warmup_base_lr_scale, r.warmup_base_lr_ramp) for r in r16[:3]] == [(0.1, True), (1.0, False),
                                                                                   (0.1, False)]
    assert (cfgs["relora"].relora.rank, cfgs["relora"].relora.warmup_base_lr_scale) == (48, 0.01)
