"""Every ZeRO stage a user can write runs the whole PreLoRA cycle: ZeRO-1, ZeRO-2 (with and without the optimizer
offloaded), ZeRO-3 (fp32 and bf16) and a run whose phases change the engine (ZeRO-3 with micro batch 16 in full and
warmup, ZeRO-2 with 32 in relora and lora) in one launch of the product's entry point (tests/scripts/zero_stages.py),
with ReLoRA merges, compared with each other; then that run killed in relora and resumed on 2 ranks, then on 1 rank
(universal checkpoint of a ZeRO-3 warmup)."""

from __future__ import annotations

import json
import re

import pytest
import timm
import torch
from safetensors.torch import load_file

from prelora_ds.metrics.readers import scalars
from prelora_ds.testing.harness import BIN, PHASE_ENGINES, SWITCH, TINY, mpirun_cmd, run, summary

pytestmark = pytest.mark.launch

# full 0-4, relora 4-16 (merges after steps 7, 10, 13 at uniform rank 8; at 16 the switch comes first), warmup
# 16-20, lora 20-28 on a tiny ViT; every stage runs the same data and seed
CYCLE = [*TINY, "--train.max_steps", "28", *SWITCH[:-2], "--prelora.warmup_steps", "4",
         "--train.checkpoint_every_steps", "4", "--relora.enabled", "true", "--relora.start_step", "4",
         "--relora.rank", "8", "--relora.merge_every_steps", "3", "--relora.restart_warmup_steps", "1"]  # fmt: skip
TIMELINE = [("full", 0, 4), ("relora", 4, 16), ("warmup", 16, 20), ("lora", 20, 28)]
# fp32: the same run up to the reduction order (`phased`: also another grouping of the same images into micro batches)
STAGES = ("stage1", "stage2", "stage2_offload", "stage3", "phased")
BF16_TOL = 0.05  # stage 3 in bf16 against stage 2 in fp32: bf16 rounding of every matmul
STAGE_TOL = 2e-3  # the same computation with another partitioning: fp32 reduction order only


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero")
    proc = run(mpirun_cmd(out, *CYCLE, script="tests/scripts/zero_stages.py"), timeout=900)
    (out / "stdout.txt").write_text(proc.stdout)
    return out


def timeline(out):
    return [(p["name"], p["start_step"], p["end_step"]) for p in summary(out)["phases"]]


def test_every_stage_runs_through_the_switch(stages):
    assert json.loads((stages / "codes.json").read_text()) == dict.fromkeys((*STAGES, "stage3_bf16", "phased"), 0)
    for rank in (0, 1):  # no engine, optimizer or model of a finished run is left alive (ZeRO-3 kept each one)
        leaks = json.loads((stages / f"leaks.rank{rank}.json").read_text())
        assert leaks == dict.fromkeys((*STAGES, "stage3_bf16"), {}), leaks
    reference = stages / "stage2"
    for name in (*STAGES, "stage3_bf16"):
        run_dir = stages / name
        assert timeline(run_dir) == TIMELINE, name
        assert summary(run_dir)["relora_merges"] == 3, name
        s = summary(run_dir)
        params = [(p["trainable_params"], p["total_params"]) for p in s["phases"]]
        expected = [(p["trainable_params"], p["total_params"]) for p in summary(reference)["phases"]]
        assert params[:2] == expected[:2], name  # ZeRO-3 counts whole parameters (ds_numel), not its partitions
        if name != "stage3_bf16":  # bf16 rounding moves the norm changes, so the ranks may differ there
            assert params == expected, name
            ranks = json.loads((run_dir / "ranks.json").read_text())
            assert ranks == json.loads((reference / "ranks.json").read_text()), name


def test_merged_lora_layer_equals_peft_under_zero2_and_zero3(stages):
    """prelora.lora_layer merged against PEFT's layer inside ZeRO-2, ZeRO-3 and ZeRO-3 bf16 engines, base frozen and
    trainable: outputs, every reduced gradient and every updated fp32 master bit for bit (exact integer arithmetic;
    tests/scripts/zero_stages.py lora_layer_check)."""
    want = {"outputs": True, "grads": True, "base_grads": True, "masters": True}
    for rank in (0, 1):
        got = json.loads((stages / f"lora_layer.rank{rank}.json").read_text())
        assert got == {f"{s}/{p}": want for s in ("stage2", "stage3", "stage3_bf16") for p in ("lora", "warmup")}


def test_zero3_builds_the_model_partitioned_with_the_same_initial_weights(stages):
    """Under ZeRO-3 no rank allocates the whole model (deepspeed.zero.Init), yet the initial weights are timm's
    init drawn exactly as under ZeRO-2 (rank 0 draws them, the partitions are written from them), and the random
    numbers drawn after it (data order, LoRA factors) are the same: the first loss is ZeRO-2's to fp32 rounding."""
    built = re.findall(r"ZeRO-3: model built partitioned \(deepspeed.zero.Init\): rank 0 allocated ([\d,]+) of "
                       r"([\d,]+) parameter elements", (stages / "stdout.txt").read_text())
    assert len(built) == 3, built  # stage3, stage3_bf16, phased (full); the ZeRO-1/2 runs build whole models
    for held, whole in built:
        held, whole = int(held.replace(",", "")), int(whole.replace(",", ""))
        assert whole > 100_000 and held <= whole // 2 + 2 * 1024, (held, whole)  # its half (+ alignment padding)
    ref = dict(scalars(stages / "stage2")["1_train/loss"])
    first = dict(scalars(stages / "stage3")["1_train/loss"])[1]
    assert abs(first - ref[1]) < 1e-5, (first, ref[1])  # timm's init on placeholders moved it by 0.196


def test_stages_compute_the_same_run(stages):
    ref_tb = scalars(stages / "stage2")
    ref = dict(ref_tb["1_train/loss"])
    for name in STAGES:
        tb = scalars(stages / name)
        loss = dict(tb["1_train/loss"])
        assert sorted(loss) == list(range(1, 29)), name
        worst = max(abs(loss[s] - ref[s]) for s in loss)
        assert worst <= STAGE_TOL, (name, worst)
        norms = dict(tb["4_weight_norm/attn.qkv"])  # the convergence test's input, read from the partitions
        assert max(abs(v - dict(ref_tb["4_weight_norm/attn.qkv"])[s]) for s, v in norms.items()) < 1e-3
        # base / LoRA / effective norms from relora on, read from every stage's partitions: stage 2's to the fp32
        # reduction order (measured: equal under ZeRO-1, 2e-7 offloaded, 1.1e-4 of the series' largest under ZeRO-3)
        for kind in ("base", "lora", "effective"):
            got, want = dict(tb[f"lora_norm/{kind}/mean"]), dict(ref_tb[f"lora_norm/{kind}/mean"])
            assert sorted(got) == sorted(want) == [*range(5, 17), 20, 24, 28], (name, kind, sorted(got))
            assert max(abs(got[s] - want[s]) for s in want) <= 1e-3 * max(want.values()), (name, kind)
        delta, base = dict(tb["lora_norm/lora/mean"]), dict(tb["lora_norm/base/mean"])
        assert [delta[s] for s in (8, 11, 14)] == [0.0] * 3, name  # B = 0 after each merge (the LR restarts at 0)
        assert delta[20] < delta[24] < delta[28] and base[20] == base[24] == base[28], name  # lora: B grows, W stays
        assert [v for _, v in tb["relora/pruned_share"]] == pytest.approx([0.9] * 3, abs=0.02)
    bf16 = dict(scalars(stages / "stage3_bf16")["1_train/loss"])
    assert max(abs(bf16[s] - ref[s]) for s in ref) <= BF16_TOL


def test_every_stage_exports_the_model_it_trained(stages):
    ref = load_file(stages / "stage2" / "model_merged.safetensors")
    for name in STAGES:
        state = load_file(stages / name / "model_merged.safetensors")
        assert state.keys() == ref.keys()
        worst = max(float((state[k] - ref[k]).abs().max()) for k in ref)
        assert worst < 1e-3, (name, worst)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=16, patch_size=4, depth=4,
                              embed_dim=64, num_heads=2)  # fmt: skip
    model.load_state_dict(load_file(stages / "stage3" / "model_merged.safetensors"))
    assert torch.isfinite(model(torch.randn(2, 3, 16, 16))).all()


def test_phase_engines_switch_stage_and_micro_batch_at_each_rebuild(stages):
    """The `phased` run rebuilds whole (ZeRO-2) at relora, partitioned (ZeRO-3) at warmup, whole at lora, and its
    loader regroups the epoch's images at each micro batch change; the run is stage 2's (test above)."""
    log = (stages / "stdout.txt").read_text()
    changes = re.findall(r"\[(\w+)\] engine: ZeRO stage (\d), optimizer offload none -> ZeRO stage (\d)", log)
    assert changes == [("relora", "3", "2"), ("warmup", "2", "3"), ("lora", "3", "2")], changes  # rank 0 logs
    regroups = re.findall(r"\[(\w+)\] step (\d+): micro batch x accumulation (\d+) x (\d+) -> (\d+) x (\d+)", log)
    assert regroups == [("relora", "4", "16", "2", "32", "1"), ("warmup", "16", "32", "1", "16", "2"),
                        ("lora", "20", "16", "2", "32", "1")], regroups
    settings = json.loads((stages / "phased" / "checkpoints" / "step00000028" / "trainer_state.json").read_text())
    assert settings["engine_settings"] == {"zero_stage": 2, "offload_optimizer": False, "micro_batch": 32,
                                           "activation_checkpointing": False}


def test_phased_run_killed_in_relora_resumes_on_two_then_on_one_rank(tmp_path, stages):
    """SIGKILL in relora (ZeRO-2, micro 32; after its first merge), resume on 2 ranks to step 18 (warmup, ZeRO-3),
    then on 1 rank through DeepSpeed's universal checkpoint of that ZeRO-3 warmup to the end (lora on ZeRO-2, micro
    32 x accumulation 2): the resumed losses continue the uninterrupted phased run. A resume whose recipe moved the
    checkpoint's phase to another ZeRO stage is refused before start-up."""
    out = tmp_path / "run"
    config = json.loads((stages / "phased.rank0.json").read_text())  # train_batch_size 64: accumulation derived
    (tmp_path / "phased.json").write_text(json.dumps(config))
    cmd = [*CYCLE, "--deepspeed_config", str(tmp_path / "phased.json"), "--output_dir", str(out), *PHASE_ENGINES]
    killed = run(mpirun_cmd(*cmd), check=False, env={"PRELORA_FAULTS": "kill@10:1"})
    assert killed.returncode != 0
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000008"
    moved = run([str(BIN / "python"), "-m", "prelora_ds.train", *cmd, "--resume", "--engine.relora",
                 "{zero_stage: 3}"], check=False)
    assert moved.returncode == 2 and "the relora engine's zero_stage was 2, now 3 (set it back in engine.relora" \
        in moved.stderr, moved.stderr[-2000:]
    resumed = run(mpirun_cmd(*cmd, "--resume", "--train.stop_at_step", "18"))
    assert "resumed at step 8 (epoch 0, phase relora)" in resumed.stdout
    single = run([str(BIN / "python"), "-m", "prelora_ds.train", *cmd, "--resume"])
    assert "resuming step00000018, saved by 2 rank(s), on 1 rank(s)" in single.stdout
    assert "resumed at step 18 (epoch 0, phase warmup)" in single.stdout
    assert "[lora] step 20: micro batch x accumulation 16 x 4 -> 32 x 2" in single.stdout
    assert timeline(out) == TIMELINE and summary(out)["relora_merges"] == 3
    a, b = dict(scalars(stages / "phased")["1_train/loss"]), dict(scalars(out)["1_train/loss"])
    assert max(abs(a[s] - b[s]) for s in range(1, 19)) <= STAGE_TOL
    assert max(abs(a[s] - b[s]) for s in range(19, 29)) <= STAGE_TOL  # 1 rank: another reduction order
