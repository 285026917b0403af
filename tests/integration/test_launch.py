"""Real jobs on 2 CPU ranks: the PreLoRA switch of the acceptance command, and a plain single process.

U: `deepspeed --num_gpus 2` with the switch flags of the acceptance command, uninterrupted (the
reference that test_reliability's interrupted runs, launched by hostfile, mpirun, deepspeed and as a
single process, are compared to). P: a plain single process.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import timm
import torch
from safetensors.torch import load_file

from prelora_ds.metrics.readers import custom_scalars_charts, scalars
from prelora_ds.testing.harness import BIN, SWITCH_RUN, run, summary

pytestmark = pytest.mark.launch

COMMON = SWITCH_RUN


@pytest.fixture(scope="module")
def uninterrupted(switch_reference):
    return switch_reference


def test_acceptance_run_switches_full_warmup_lora(uninterrupted):
    s = summary(uninterrupted)
    assert [p["name"] for p in s["phases"]] == ["full", "warmup", "lora"]
    full, warm, lora = s["phases"]
    assert full["start_step"] == 0 and full["end_step"] == warm["start_step"] == s["switch_step"]
    # windows close every 4 steps; 3 windows are needed, so the test can first pass at step 12
    assert s["switch_step"] == 12
    assert warm["end_step"] - warm["start_step"] == 8 and lora["end_step"] == 40
    assert full["trainable_params"] == full["total_params"]
    assert warm["trainable_params"] == warm["total_params"] > full["total_params"]
    assert lora["trainable_params"] < 0.3 * lora["total_params"]
    assert all(p["median_step_s"] > 0 for p in s["phases"])
    assert s["world_size"] == 2 and s["train_batch_size"] == 64


def test_launch_output_reads_cleanly_in_a_log_file(uninterrupted):
    """Captured to a pipe, as a log file holds it: no library deprecation notice, no progress bar redrawn with
    carriage returns, the plain progress line at the last step, and the closing commands."""
    log = (uninterrupted.parent / "launch.log").read_text()
    assert "FutureWarning" not in log and "Warning: `torch.distributed" not in log
    assert "\r" not in log
    assert max(len(line) for line in log.splitlines()) < 1000
    assert re.search(r"^step 40/40 \(100%\) \[lora\] loss \d+\.\d{4} lr ", log, re.MULTILINE), log[-2000:]
    assert f"--logdir {uninterrupted / 'tb'}" in log and "prelora plot" in log


def test_ranks_json_powers_of_two_and_param_count(uninterrupted):
    ranks = json.loads((uninterrupted / "ranks.json").read_text())
    assert len(ranks) == 4 * 6  # qkv, proj, fc1, fc2 in 6 blocks
    assert set(ranks.values()) <= {8, 16, 32, 64}
    assert all(k.startswith("blocks.") for k in ranks) and not any("patch_embed" in k for k in ranks)
    # the lora phase trains exactly LoRA (r x (in + out) per layer) + head + LayerNorms
    model = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=16, patch_size=4, depth=6)
    lora = sum(r * (model.get_submodule(n).in_features + model.get_submodule(n).out_features) for n, r in ranks.items())
    extra = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("head.", "norm.")) or ".norm" in n)
    assert summary(uninterrupted)["phases"][2]["trainable_params"] == lora + extra


def test_tensorboard_has_norms_losses_phases(uninterrupted):
    tb = scalars(uninterrupted)
    for tag in ("1_train/loss", "1_train/lr", "train/images_per_s", "train/grad_norm", "train/memory_bytes",
                "2_val/top1", "4_weight_norm/attn.qkv", "4_weight_norm/mlp.fc2", "norm_layer/attn.qkv/00",
                "3_prelora_test/dL", "3_prelora_test/D/mlp.fc1", "lora_norm/lora/mean", "lora_norm/effective/mean",
                "1_train/phase", "1_train/trainable_params", "ranks/attn.qkv"):
        assert tag in tb, tag
    assert [s for s, _ in tb["1_train/loss"]] == list(range(1, 41))
    # the module norms go on through every phase: the effective weight W + s B A after the switch at 12
    assert max(s for s, _ in tb["4_weight_norm/attn.qkv"]) > 20
    ranks = json.loads((uninterrupted / "ranks.json").read_text())
    assert tb["ranks/attn.qkv"] == [(i, ranks[f"blocks.{i}.attn.qkv"]) for i in range(6)]  # x: the layer index
    # B starts at zero: the LoRA delta is 0 at the switch (step 12), then grows at every sample through warmup and
    # lora (measured 0.114 at 16 to 0.470 at 40; test_references: every layer's through lora)
    samples = tb["lora_norm/lora/mean"]
    assert [s for s, _ in samples] == list(range(16, 41, 4))
    delta = [v for _, v in samples]
    assert 0 < delta[0] and all(b > a for a, b in zip(delta, delta[1:], strict=False)), delta


def test_custom_scalars_layout_charts_what_the_run_wrote(uninterrupted):
    """TensorBoard's custom-scalars layout in the run's events: one chart per module type with a line per layer,
    and every chart's regexes find series the run wrote (tools/tb_screenshot.sh shows it in a browser)."""
    tb = scalars(uninterrupted)
    charts = custom_scalars_charts(uninterrupted)
    assert charts
    for title, regexes in charts.items():
        matched = [t for t in tb if any(re.fullmatch(r, t) for r in regexes)]
        assert matched, f"chart {title!r} ({regexes}) matches no tag the run wrote"
    layers = json.loads((uninterrupted / "windows.json").read_text())["layers"]
    for module, names in layers.items():
        lines = [t for t in tb if any(re.fullmatch(r, t) for r in charts[f"{module}: norm per layer"])]
        assert len(lines) == len(names), (module, lines)
        effective = [t for t in tb if any(re.fullmatch(r, t) for r in charts[f"{module}: ||effective|| per layer"])]
        assert sorted(effective) == sorted(f"lora_norm/effective/{n}" for n in names)
    assert charts["train loss"] == ["1_train/loss"]
    # each phase is a TensorBoard run of its own (its own colour, its own smoothing), holding that phase's steps
    by_phase = {p: dict(scalars(uninterrupted, phase=p)["1_train/loss"]) for p in ("full", "warmup", "lora")}
    assert [sorted(by_phase[p]) for p in ("full", "warmup", "lora")] == [list(range(1, 13)), list(range(13, 21)),
                                                                         list(range(21, 41))]
    trainable = {p: {v for _, v in scalars(uninterrupted, phase=p)["1_train/trainable_params"]} for p in by_phase}
    assert all(len(v) == 1 for v in trainable.values()), trainable  # one flat line per phase: smoothing cannot bend it


def test_merged_model_loads_into_timm_and_reproduces_val_accuracy(uninterrupted):
    from prelora_ds.config.sections import DataConfig
    from prelora_ds.data.datasets import build_datasets

    state = load_file(str(uninterrupted / "model_merged.safetensors"))
    model = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=16, patch_size=4, depth=6)
    model.load_state_dict(state)  # strict: a plain timm state dict, no LoRA keys
    model.eval()
    data = build_datasets(DataConfig(dataset="digits", auto_augment=None), 16, 3, seed=0,
                          mean=model.pretrained_cfg["mean"], std=model.pretrained_cfg["std"])
    correct = 0
    with torch.no_grad():
        for i in range(0, len(data.val), 64):
            batch = [data.val[j] for j in range(i, min(i + 64, len(data.val)))]
            x = torch.stack([b[0] for b in batch])
            y = torch.tensor([b[1] for b in batch])
            correct += int((model(x).argmax(1) == y).sum())
    top1 = 100 * correct / len(data.val)
    assert abs(top1 - summary(uninterrupted)["final_val_top1"]) <= 100 / len(data.val) + 1e-9


def test_single_process(tmp_path):
    out = tmp_path / "run"
    proc = run([str(BIN / "python"), "-m", "prelora_ds.train", "--recipe", "recipes/demo.yaml", "--output_dir",
                str(out), "--train.max_steps", "6", "--prelora.enabled", "false", "--resume"])
    assert "no checkpoint to resume" in proc.stdout
    s = summary(out)
    assert s["world_size"] == 1 and s["train_batch_size"] == 32
    assert [p["name"] for p in s["phases"]] == ["full"] and s["steps"] == 6
    assert s["skipped_images"] == 0
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000006"
    assert "model_merged.safetensors" in proc.stdout
    shutil.rmtree(out / "checkpoints")
