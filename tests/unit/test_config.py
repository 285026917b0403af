"""Recipe loading, `--section.field value` overrides and validation messages (real PyYAML, no mocks)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from prelora_ds.config.recipe import SECTIONS, apply_overrides, build_config, load_recipe, parse_override_value
from prelora_ds.config.sections import RunConfig
from prelora_ds.errors import ConfigError
from prelora_ds.testing.harness import REPO


def cfg_with(**overrides: str) -> RunConfig:
    """Build from defaults plus overrides given as command-line text, e.g. cfg_with(**{"train.epochs": "5"})."""
    return build_config(apply_overrides({}, {k: parse_override_value(v) for k, v in overrides.items()}))


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------------------------- defaults, YAML


def test_defaults_validate():
    cfg = build_config({})
    assert cfg.to_dict() == RunConfig().to_dict()
    assert SECTIONS == ("data", "model", "train", "prelora", "relora", "engine")
    assert (cfg.data.dataset, cfg.prelora.r_min, cfg.prelora.r_max) == ("digits", 8, 64)
    assert load_recipe(None).to_dict() == cfg.to_dict()


def test_recipe_yaml_loads_and_types(tmp_path):
    path = write(tmp_path, "train: {epochs: 7, min_lr: 1.0e-4}\nprelora: {delta_w: 2}\nmodel:\n  kwargs: {depth: 3}\n")
    cfg = load_recipe(path)
    assert cfg.train.epochs == 7
    assert cfg.train.min_lr == pytest.approx(1e-4)
    assert cfg.prelora.delta_w == 2.0 and isinstance(cfg.prelora.delta_w, float)  # int accepted for a float field
    assert cfg.model.kwargs == {"depth": 3}
    assert cfg.data.dataset == "digits"  # untouched sections keep their defaults


def test_demo_recipe_loads():
    cfg = load_recipe(REPO / "recipes" / "demo.yaml")
    assert cfg.model.name == "vit_tiny_patch16_224"
    assert cfg.data.scale == [0.7, 1.0]
    assert cfg.train.deepspeed_config == "ds_configs/cpu_zero2_fp32.json"


def test_empty_recipe_file_is_defaults(tmp_path):
    assert load_recipe(write(tmp_path, "")).to_dict() == RunConfig().to_dict()


def test_overrides_win_over_recipe_and_merge_nested(tmp_path):
    path = write(tmp_path, "train: {epochs: 7}\nmodel:\n  kwargs: {img_size: 16, depth: 4}\n")
    cfg = load_recipe(path, {"train.epochs": 3, "model.kwargs.depth": 6})
    assert cfg.train.epochs == 3
    assert cfg.model.kwargs == {"img_size": 16, "depth": 6}


@pytest.mark.parametrize(
    "text",
    ["- train\n- data\n", "just a string\n"],
    ids=["list", "scalar"],
)
def test_recipe_file_not_a_mapping(tmp_path, text):
    with pytest.raises(ConfigError, match="a recipe must be a mapping of sections"):
        load_recipe(write(tmp_path, text))


def test_recipe_section_not_a_mapping_from_file(tmp_path):
    with pytest.raises(ConfigError, match="recipe section 'train' must be a mapping of fields"):
        load_recipe(write(tmp_path, "train: 5\n"))


def test_build_config_not_a_mapping():
    with pytest.raises(ConfigError, match=r"a recipe must be a mapping of sections \(data, model, .*\), got list"):
        build_config(["train"])
    with pytest.raises(ConfigError, match=r"recipe section 'train' must be a mapping of fields, got 5"):
        build_config({"train": 5})


def test_recipe_file_missing(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=rf"recipe {re.escape(str(missing))} does not exist; pass --recipe"):
        load_recipe(missing)


def test_recipe_invalid_yaml(tmp_path):
    path = write(tmp_path, "train:\n  epochs: [1, 2\n")
    with pytest.raises(ConfigError, match=rf"(?s)recipe {re.escape(str(path))} is not valid YAML: .*line 2, column 11"):
        load_recipe(path)


@pytest.mark.parametrize("recipe", [None, REPO / "recipes" / "demo.yaml"], ids=["defaults", "demo"])
def test_to_yaml_round_trip(recipe):
    cfg = load_recipe(recipe, {"train.max_steps": 12, "data.auto_augment": None})
    text = cfg.to_yaml()
    again = build_config(yaml.safe_load(text))
    assert again.to_dict() == cfg.to_dict()
    assert again.train.max_steps == 12 and again.data.auto_augment is None
    assert again.prelora.target_modules == RunConfig().prelora.target_modules  # regex backslashes survive


# ----------------------------------------------------------------------------------------------- override values


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("12", 12),
        ("0.5", 0.5),
        ("1.0e-3", 1e-3),
        ("true", True),
        ("false", False),
        ("null", None),
        ("[0.5, 1.0]", [0.5, 1.0]),
        ("{depth: 6}", {"depth": 6}),
        ("runs/x", "runs/x"),
        ("{unclosed", "{unclosed"),  # invalid YAML stays the raw text
    ],
)
def test_parse_override_value(text, value):
    parsed = parse_override_value(text)
    assert parsed == value and type(parsed) is type(value)


def test_float_override_exponent_without_dot():
    assert parse_override_value("1e-3") == pytest.approx(1e-3)
    assert cfg_with(**{"train.min_lr": "1e-3"}).train.min_lr == pytest.approx(1e-3)


def test_overrides_applied_and_coerced():
    cfg = cfg_with(
        **{
            "train.max_steps": "12",
            "train.min_lr": "1.0e-3",
            "prelora.delta_w": "3",  # int for a float field
            "prelora.enabled": "false",
            "data.scale": "[0.5, 1.0]",
            "data.auto_augment": "null",
            "model.kwargs": "{depth: 6}",
        }
    )
    assert cfg.train.max_steps == 12
    assert cfg.train.min_lr == pytest.approx(1e-3)
    assert cfg.prelora.delta_w == 3.0 and type(cfg.prelora.delta_w) is float
    assert cfg.prelora.enabled is False
    assert cfg.data.scale == [0.5, 1.0]
    assert cfg.data.auto_augment is None
    assert cfg.model.kwargs == {"depth": 6}


def test_nested_override_field():
    cfg = cfg_with(**{"model.kwargs.depth": "6", "model.kwargs.embed_dim": "64"})
    assert cfg.model.kwargs == {"depth": 6, "embed_dim": 64}


def test_nested_override_into_non_mapping_field():
    with pytest.raises(ConfigError, match=r"data\.scale"):
        load_recipe(REPO / "recipes" / "demo.yaml", {"data.scale.x": 1})


def test_apply_overrides_copies():
    raw = {"train": {"epochs": 7}}
    merged = apply_overrides(raw, {"train.epochs": 3})
    assert merged == {"train": {"epochs": 3}}
    assert raw == {"train": {"epochs": 7}}


def test_override_without_field():
    with pytest.raises(ConfigError, match=r"override --train must name a field as --section\.field"):
        apply_overrides({}, {"train": 3})


# ----------------------------------------------------------------------------------------------- rejections


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"train.max_step": "12"}, "unknown recipe key train.max_step. Did you mean 'max_steps'?"),
        ({"prelora.r_mn": "8"}, "unknown recipe key prelora.r_mn. Did you mean 'r_min'?"),
        ({"trian.max_steps": "12"}, "unknown override section --trian.max_steps. Did you mean 'train'?"),
        (
            {"train.zzzzz": "1"},
            "unknown recipe key train.zzzzz. Known: checkpoint_every_steps, collective_timeout_s, deepspeed_config,",
        ),
        ({"train.epochs": "abc"}, "train.epochs='abc' must be an integer (got str)."),
        ({"train.epochs": "2.5"}, "train.epochs=2.5 must be an integer (got float)."),
        ({"train.epochs": "true"}, "train.epochs=True must be an integer (got bool)."),
        ({"train.max_steps": "abc"}, "train.max_steps='abc' must be an integer (got str)."),
        ({"prelora.delta_w": "true"}, "prelora.delta_w=True must be a float (got bool)."),
        ({"prelora.enabled": "1"}, "prelora.enabled=1 must be true or false."),
        ({"data.scale": "0.5"}, "data.scale=0.5 must be a list, e.g. [0.08, 1.0]."),
        ({"data.scale": "[0.5, x]"}, "data.scale[1]='x' must be a float (got str)."),
        ({"model.kwargs": "6"}, "model.kwargs=6 must be a mapping, e.g. {depth: 6}."),
        ({"prelora.delta_w": "0"}, "prelora.delta_w must be > 0 (a percentage), got 0.0."),
        ({"prelora.delta_l": "-1"}, "prelora.delta_l must be > 0 (a percentage), got -1.0."),
        (
            {"prelora.r_min": "64", "prelora.r_max": "8"},
            "prelora.r_min=64 is larger than prelora.r_max=8; swap them.",
        ),
        (
            {"prelora.r_min": "12"},
            "prelora.r_min=12 is not a power of two; write one of 4, 8, 16, 32, 64, 128.",
        ),
        ({"prelora.r_max": "0"}, "prelora.r_max=0 is not a power of two"),
        (
            {"prelora.num_windows": "1"},
            "prelora.num_windows must be >= 2 (the test compares consecutive windows), got 1.",
        ),
        ({"prelora.target_modules": "blocks[.attn"}, "prelora.target_modules / trainable_extra is not a valid regex"),
        ({"prelora.trainable_extra": "(head"}, "prelora.target_modules / trainable_extra is not a valid regex"),
        ({"data.dataset": "imagefolder"}, "data.dataset=imagefolder needs data.root: a folder with train/ and val/"),
        ({"data.dataset": "imagenet"}, "data.dataset='imagenet' is unknown; write one of imagefolder, digits"),
        (
            {"data.scale": "[1.0, 0.5]"},
            "data.scale must be [min, max] with 0 < min <= max <= 1, got [1.0, 0.5].",
        ),
        ({"data.scale": "[0, 1]"}, "data.scale must be [min, max] with 0 < min <= max <= 1, got [0.0, 1.0]."),
        ({"data.scale": "[0.5]"}, "data.scale must be [min, max] with 0 < min <= max <= 1, got [0.5]."),
        ({"data.scale": "[0.5, 1.5]"}, "data.scale must be [min, max] with 0 < min <= max <= 1, got [0.5, 1.5]."),
        ({"relora.reset": "zero"}, "relora.reset='zero': write 'magnitude' or 'full'."),
        ({"relora.warmup_base_lr_scale": "0"}, "relora.warmup_base_lr_scale must be in (0, 1], got 0.0"),
        ({"relora.warmup_base_lr_scale": "2"}, "relora.warmup_base_lr_scale must be in (0, 1], got 2.0"),
        ({"model.kwargs.num_classes": "10"}, "model.kwargs.num_classes is set by the dataset; remove it"),
        ({"train.max_steps": "0"}, "train.max_steps must be >= 1 or null, got 0."),
    ],
)
def test_rejected_with_message(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        cfg_with(**overrides)


def test_unknown_section_in_recipe(tmp_path):
    with pytest.raises(ConfigError, match=re.escape("unknown recipe section 'prelroa'. Did you mean 'prelora'?")):
        load_recipe(write(tmp_path, "prelroa: {r_min: 8}\n"))


def test_unknown_key_in_recipe_file(tmp_path):
    with pytest.raises(ConfigError, match=re.escape("unknown recipe key train.max_step. Did you mean 'max_steps'?")):
        load_recipe(write(tmp_path, "train: {max_step: 12}\n"))


def test_imagefolder_with_root_is_accepted():
    cfg = cfg_with(**{"data.dataset": "imagefolder", "data.root": "/datasets/imagenet"})
    assert (cfg.data.dataset, cfg.data.root) == ("imagefolder", "/datasets/imagenet")


def test_step_sampling_needs_windows_of_steps():
    """Windows of epochs close at an epoch's end, where no step-based sample falls: they would never close."""
    expected = r"prelora.sample_every_steps=5 needs windows of steps.*set prelora.window_steps"
    with pytest.raises(ConfigError, match=expected):
        build_config({"prelora": {"sample_every_steps": 5}})
    assert build_config({"prelora": {"sample_every_steps": 5, "window_steps": 20}}).prelora.sample_every_steps == 5
