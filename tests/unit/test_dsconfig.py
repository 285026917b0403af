"""DeepSpeed JSON checks: batch triple arithmetic, "auto" rejection, required sections, strict-JSON loading."""

from __future__ import annotations

import json
import re

import pytest

from prelora_ds.config.deepspeed import (
    engine_record,
    load_ds_config,
    peak_lr,
    phase_configs,
    phase_ds_config,
    prepare_ds_config,
    resolve_batch,
    zero_stage,
)
from prelora_ds.errors import ConfigError
from prelora_ds.testing.harness import REPO

G, M, A = "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"


def base(**batch) -> dict:
    """A valid config apart from the batch keys given."""
    return {
        **batch,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.05}},
        "zero_optimization": {"stage": 2, "reduce_bucket_size": 50000000},
    }


# ----------------------------------------------------------------------------------------------- resolve_batch


@pytest.mark.parametrize(
    ("cfg", "world", "expected"),
    [
        ({M: 32}, 1, (32, 32, 1)),  # micro only: accum 1, global derived
        ({M: 32}, 4, (128, 32, 1)),
        ({M: 8, A: 3}, 2, (48, 8, 3)),  # micro + accum: global derived
        ({G: 64, M: 8}, 2, (64, 8, 4)),  # global + micro: accum derived
        ({G: 64, A: 4}, 2, (64, 8, 4)),  # global + accum: micro derived
        ({G: 64}, 4, (64, 16, 1)),  # global only: accum 1, micro derived
        ({G: 64, M: 8, A: 4}, 2, (64, 8, 4)),  # all three, consistent
        ({G: "auto", M: 16, A: "auto"}, 2, (32, 16, 1)),  # "auto" counts as unset
        ({G: None, M: 16}, 1, (16, 16, 1)),
    ],
)
def test_resolve_batch(cfg, world, expected):
    assert resolve_batch(cfg, world) == expected
    glob, micro, accum = expected
    assert micro * accum * world == glob


def test_resolve_batch_all_three_inconsistent():
    msg = (
        "batch arithmetic does not hold: train_micro_batch_size_per_gpu=8 x gradient_accumulation_steps=2 x "
        "world size 2 = 32, but train_batch_size=64. Set train_batch_size to 32, or remove it and let it be derived."
    )
    with pytest.raises(ConfigError, match=re.escape(msg)):
        resolve_batch({G: 64, M: 8, A: 2}, 2)


@pytest.mark.parametrize(
    ("cfg", "world", "message"),
    [
        (
            {G: 64, M: 32},
            3,
            "train_batch_size=64 is not divisible by train_micro_batch_size_per_gpu=32 x world size 3; "
            "use a multiple of 96, or set gradient_accumulation_steps explicitly (train_batch_size=64 is kept on 1, 2 "
            "rank(s)).",
        ),
        (
            {G: 100, A: 3},
            2,
            "train_batch_size=100 is not divisible by gradient_accumulation_steps=3 x world size 2; "
            "pick a train_batch_size that is a multiple of 6.",  # 100 is not a multiple of 3: no world size keeps it
        ),
        (
            {G: 10},
            4,
            "train_batch_size=10 is not divisible by gradient_accumulation_steps=1 x world size 4; "
            "pick a train_batch_size that is a multiple of 4 (train_batch_size=10 is kept on 1, 2, 5, 10 rank(s)).",
        ),
    ],
)
def test_resolve_batch_not_divisible(cfg, world, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve_batch(cfg, world)


@pytest.mark.parametrize(
    ("key", "value"),
    [(M, 0), (M, -4), (G, 0), (A, 0), (M, 2.0), (M, "32"), (M, True), (A, [2])],
)
def test_resolve_batch_non_positive_or_non_int(key, value):
    cfg = {M: 8, **{key: value}} if key != M else {key: value}
    with pytest.raises(ConfigError, match=re.escape(f"DeepSpeed {key}={value!r} must be a positive integer.")):
        resolve_batch(cfg, 1)


@pytest.mark.parametrize("cfg", [{}, {A: 4}, {G: "auto", M: "auto"}])
def test_resolve_batch_neither_micro_nor_global(cfg):
    with pytest.raises(ConfigError, match="sets neither train_micro_batch_size_per_gpu nor train_batch_size"):
        resolve_batch(cfg, 2)


# ----------------------------------------------------------------------------------------------- prepare_ds_config


def test_prepare_resolves_batch_keys_and_copies():
    cfg = base(**{G: "auto", M: 16, A: "auto"})
    out = prepare_ds_config(cfg, 2)
    assert (out[G], out[M], out[A]) == (32, 16, 1)
    assert cfg[G] == "auto" and cfg[A] == "auto"  # the input is not modified
    assert peak_lr(out) == 1e-3 and zero_stage(out) == 2


@pytest.mark.parametrize(
    ("patch", "where"),
    [
        ({"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}, "zero_optimization.reduce_bucket_size"),
        ({"gradient_clipping": "auto"}, "gradient_clipping"),
        (
            {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": ["auto", 0.999]}}},
            "optimizer.params.betas[0]",
        ),
    ],
)
def test_prepare_rejects_auto_naming_the_path(patch, where):
    cfg = {**base(**{M: 8}), **patch}
    with pytest.raises(ConfigError, match=re.escape(f'DeepSpeed config has "auto" at {where};')):
        prepare_ds_config(cfg, 1)


def test_prepare_names_every_auto():
    cfg = base(**{M: 8})
    cfg["zero_optimization"]["allgather_bucket_size"] = "auto"
    cfg["zero_optimization"]["reduce_bucket_size"] = "auto"
    with pytest.raises(ConfigError, match=re.escape("zero_optimization.reduce_bucket_size")) as exc:
        prepare_ds_config(cfg, 1)
    assert "zero_optimization.allgather_bucket_size" in str(exc.value)


def test_prepare_rejects_scheduler():
    cfg = {**base(**{M: 8}), "scheduler": {"type": "WarmupLR", "params": {}}}
    with pytest.raises(ConfigError, match='the DeepSpeed config has a "scheduler" section'):
        prepare_ds_config(cfg, 1)


@pytest.mark.parametrize(
    "optimizer",
    [None, {"type": "AdamW"}, {"type": "AdamW", "params": {"weight_decay": 0.05}}, "AdamW"],
    ids=["missing", "no-params", "no-lr", "not-a-dict"],
)
def test_prepare_requires_optimizer_lr(optimizer):
    cfg = base(**{M: 8})
    if optimizer is None:
        del cfg["optimizer"]
    else:
        cfg["optimizer"] = optimizer
    with pytest.raises(ConfigError, match=re.escape('needs an "optimizer" section with params.lr (the peak LR)')):
        prepare_ds_config(cfg, 1)


def test_prepare_requires_gradient_clipping():
    cfg = base(**{M: 8})
    del cfg["gradient_clipping"]
    with pytest.raises(ConfigError, match="does not set gradient_clipping; its default changed to 1.0"):
        prepare_ds_config(cfg, 1)
    cfg["gradient_clipping"] = 0
    assert prepare_ds_config(cfg, 1)["gradient_clipping"] == 0  # 0 is an explicit choice


def test_prepare_rejects_fp16_and_bf16():
    cfg = {**base(**{M: 8}), "fp16": {"enabled": True}, "bf16": {"enabled": True}}
    with pytest.raises(ConfigError, match="enables both fp16 and bf16; enable one"):
        prepare_ds_config(cfg, 1)
    cfg["fp16"]["enabled"] = False
    assert prepare_ds_config(cfg, 1)["bf16"] == {"enabled": True}


def test_prepare_batch_error_comes_first():
    cfg = {**base(**{G: 64, M: 32}), "scheduler": {}}
    with pytest.raises(ConfigError, match="not divisible"):
        prepare_ds_config(cfg, 3)


# ----------------------------------------------------------------------------------------------- load_ds_config


@pytest.mark.parametrize("name", ["cpu_zero2_fp32.json", "cpu_zero2_bf16.json"])
def test_shipped_cpu_configs_prepare(name):
    cfg = prepare_ds_config(load_ds_config(REPO / "ds_configs" / name), 2)
    assert cfg[M] * cfg[A] * 2 == cfg[G]
    assert zero_stage(cfg) == 2


def test_load_trailing_comma(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{\n  "train_micro_batch_size_per_gpu": 8,\n  "gradient_clipping": 1.0,\n}\n')
    msg = f"DeepSpeed config {path} is not valid JSON (line 4, column 1: "
    with pytest.raises(ConfigError, match=re.escape(msg)) as exc:
        load_ds_config(path)
    assert "no comments, no trailing commas" in str(exc.value)


def test_load_missing(tmp_path):
    path = tmp_path / "missing.json"
    with pytest.raises(
        ConfigError, match=re.escape(f"DeepSpeed config {path} does not exist; pass --deepspeed_config")
    ):
        load_ds_config(path)


def test_load_json_list(tmp_path):
    path = tmp_path / "list.json"
    path.write_text(json.dumps([{"train_micro_batch_size_per_gpu": 8}]))
    with pytest.raises(ConfigError, match=re.escape(f"DeepSpeed config {path} must be a JSON object, got list.")):
        load_ds_config(path)


def test_load_round_trip(tmp_path):
    path = tmp_path / "ok.json"
    path.write_text(json.dumps(base(**{M: 8})))
    assert load_ds_config(path) == base(**{M: 8})


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"zero_optimization": {"stage": 4}}, "DeepSpeed has stages 0, 1, 2 and 3"),
        ({"zero_optimization": {"stage": 0}, "fp16": {"enabled": True}}, "fp16 with zero_optimization.stage 0"),
        ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, "offload_param needs stage 3"),
        ({"zero_optimization": {"stage": 3, "zero_quantized_weights": True}}, r"ZeRO\+\+ quantized weights"),
    ],
)
def test_prepare_refuses_zero_settings_the_cycle_cannot_run(patch, message):
    cfg = {**json.loads((REPO / "ds_configs" / "cpu_zero2_fp32.json").read_text()), **patch}
    with pytest.raises(ConfigError, match=message):
        prepare_ds_config(cfg, 2)


# ----------------------------------------------------------------------------------------------- per-phase engines
def zero3(**batch) -> dict:
    cfg = base(**batch)
    cfg["zero_optimization"] = {"stage": 3, "offload_param": {"device": "cpu"}, "stage3_prefetch_bucket_size": 10}
    return prepare_ds_config(cfg, 2)


def test_a_phase_changes_the_stage_and_the_micro_batch_keeping_the_global_batch():
    full = zero3(**{G: 64, M: 16})
    lora = phase_ds_config(full, {"zero_stage": 2, "micro_batch": 32}, 2, "lora")
    assert (lora[G], lora[M], lora[A]) == (64, 32, 1) and (full[M], full[A]) == (16, 2)
    assert lora["zero_optimization"] == {"stage": 2}  # what only partitioned parameters use is gone
    assert full["zero_optimization"]["stage"] == 3  # the run's own config is not touched
    back = phase_ds_config(lora, {"zero_stage": 3}, 2, "warmup")
    assert zero_stage(back) == 3 and back[M] == 32


def test_a_phase_offloads_or_stops_offloading_the_optimizer():
    full = prepare_ds_config(base(**{M: 8}), 2)
    offloaded = phase_ds_config(full, {"offload_optimizer": True}, 2, "relora")
    assert offloaded["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "offload_optimizer" not in phase_ds_config(offloaded, {"offload_optimizer": False}, 2, "lora")[
        "zero_optimization"]
    record = engine_record(offloaded, True)
    assert record == {"zero_stage": 2, "offload_optimizer": True, "micro_batch": 8, "activation_checkpointing": True}


def test_a_phase_micro_batch_that_cannot_keep_the_global_batch_names_those_that_can():
    full = prepare_ds_config(base(**{G: 64, M: 32}), 2)
    with pytest.raises(ConfigError, match=re.escape(
            "engine.lora.micro_batch=24 cannot keep train_batch_size=64 on 2 rank(s) (micro batch x accumulation x "
            "ranks must be 64); micro batches that keep it: 1, 2, 4, 8, 16, 32.")):
        phase_ds_config(full, {"micro_batch": 24}, 2, "lora")


def test_a_phase_setting_goes_through_the_same_checks_as_the_config():
    full = prepare_ds_config({**base(**{M: 8}), "fp16": {"enabled": True}}, 2)
    with pytest.raises(ConfigError, match=r"^engine.lora: fp16 with zero_optimization.stage 0 keeps no fp32 masters"):
        phase_ds_config(full, {"zero_stage": 0}, 2, "lora")


def test_phase_configs_from_the_recipe():
    from prelora_ds.config.recipe import load_recipe

    cfg = load_recipe("recipes/demo.yaml" if (REPO / "recipes").is_dir() else None,
                      {"engine.lora": {"zero_stage": 3, "micro_batch": 16}, "engine.activation_checkpointing": True})
    full = prepare_ds_config(base(**{G: 64, M: 32}), 2)
    configs = phase_configs(full, cfg.engine, 2)
    assert configs["full"] is full and configs["relora"] is full and configs["warmup"] is full
    assert (zero_stage(configs["lora"]), configs["lora"][M], configs["lora"][A]) == (3, 16, 2)
    assert cfg.engine.settings("warmup") == {"activation_checkpointing": True}
    with pytest.raises(ConfigError, match=r"engine.lora.micro is not a per-phase engine setting; write any of "
                                          r"zero_stage, offload_optimizer, micro_batch, activation_checkpointing"):
        load_recipe(None, {"engine.lora": {"micro": 16}})
    with pytest.raises(ConfigError, match=r"engine.warmup.zero_stage=4: DeepSpeed has stages 0-3."):
        load_recipe(None, {"engine.warmup": {"zero_stage": 4}})
