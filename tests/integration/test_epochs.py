"""What the recipes use: windows, warmup and ReLoRA counted in epochs, max_epochs forcing, relora.reset full,
eval_every_epochs, one checkpoint per step, and a resume with another micro batch. Three launches:
the uninterrupted run, the same run stopped mid-relora, its resume at micro batch 16 x 2 accumulation."""

from __future__ import annotations

import json

import pytest

from prelora_ds.metrics.readers import scalar_events, scalars
from prelora_ds.testing.harness import REPO, TINY, mpirun_cmd, run, summary

pytestmark = pytest.mark.launch

# 22 steps an epoch. full 0-22; relora from the end of epoch 1 (merges every 10 steps, Adam's first moment
# reset in full); at the end of epoch 2 max_epochs forces the switch with one relora window closed; warmup
# for one epoch, then lora to the end of epoch 5. Thresholds no run passes, so only max_epochs switches.
EPOCH_RUN = [
    *TINY, "--train.epochs", "5", "--train.eval_every_epochs", "2",
    "--prelora.window_epochs", "1", "--prelora.num_windows", "3", "--prelora.delta_w", "0.001",
    "--prelora.delta_l", "0.001", "--prelora.max_epochs", "2", "--prelora.warmup_epochs", "1",
    "--relora.enabled", "true", "--relora.start_epoch", "1", "--relora.rank", "8",
    "--relora.merge_every_steps", "10", "--relora.reset", "full", "--relora.restart_warmup_steps", "2",
]  # fmt: skip
SPE = 22
STOP = SPE + 12  # in relora, after its first merge (at 32)
MICRO_TOL = 2e-3  # micro batch 16 x 2 accumulation vs 32 x 1: the same images, another fp32 summation order


@pytest.fixture(scope="module")
def epoch_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("epochs")
    ds = json.loads((REPO / "ds_configs" / "cpu_zero2_fp32.json").read_text())
    ds.update(train_micro_batch_size_per_gpu=16, gradient_accumulation_steps=2)
    small = base / "micro16.json"
    small.write_text(json.dumps(ds))
    ref, cut = base / "reference", base / "cut"
    run(mpirun_cmd("--output_dir", ref, *EPOCH_RUN))
    stopped = run(mpirun_cmd("--output_dir", cut, *EPOCH_RUN, "--train.stop_at_step", str(STOP)))
    resumed = run(mpirun_cmd("--output_dir", cut, *EPOCH_RUN, "--deepspeed_config", small, "--resume"))
    return ref, cut, stopped, resumed


def timeline(out):
    return [(p["name"], p["start_step"], p["end_step"]) for p in summary(out)["phases"]]


def test_epoch_mode_phases_relora_and_forced_switch(epoch_runs):
    ref = epoch_runs[0]
    s = summary(ref)
    assert s["steps_per_epoch"] == SPE
    assert timeline(ref) == [("full", 0, SPE), ("relora", SPE, 2 * SPE), ("warmup", 2 * SPE, 3 * SPE),
                             ("lora", 3 * SPE, 5 * SPE)]  # fmt: skip
    checks = json.loads((ref / "windows.json").read_text())["checks"]
    assert [(c["step"], c["phase"], c["passed"], c["forced"]) for c in checks] == [
        (SPE, "full", False, False),  # ReLoRA comes first
        (2 * SPE, "relora", False, True),  # forced with a single relora window: no evidence for ranks
    ]
    assert "max_epochs=2" in checks[-1]["reason"] and (s["switch_step"], s["switch_epoch"]) == (2 * SPE, 1)
    ranks = json.loads((ref / "ranks.json").read_text())
    assert len(ranks) == 4 * 4 and set(ranks.values()) == {16}  # the middle of [8, 16, 32, 64], every layer
    tb = scalars(ref)
    assert [step for step, _ in tb["relora/merges"]] == [SPE + 10, SPE + 20]
    assert [v for _, v in tb["relora/pruned_share"]] == [1.0, 1.0]  # reset: full zeroes every first moment
    assert [v["step"] for v in s["val"]] == [2 * SPE, 4 * SPE, 5 * SPE]  # eval_every_epochs 2, and the last step


def test_one_checkpoint_per_step(epoch_runs):
    """A switch at an epoch end used to save its step twice (deleting the first save before the second)."""
    ref = epoch_runs[0]
    events = scalar_events(ref, "checkpoint/save_s")  # every event, not the per-step series `scalars` merges
    assert sorted(events) == [SPE, 2 * SPE, 3 * SPE, 4 * SPE, 5 * SPE]
    final = ref / "checkpoints" / f"step{5 * SPE:08d}"
    assert (final / "COMPLETE").exists()
    assert (final / "frozen_fp32.pt").exists()  # a universal load restores optimizer parameters only


def test_resume_with_another_micro_batch_continues_the_run(epoch_runs):
    ref, cut, stopped, resumed = epoch_runs
    assert f"stopped at step {STOP}" in stopped.stdout + stopped.stderr
    assert f"resumed at step {STOP} (epoch 1, phase relora)" in resumed.stdout
    assert "16 micro x 2 accumulation x 2 ranks = 64" in resumed.stdout
    assert timeline(cut) == timeline(ref)
    assert json.loads((cut / "ranks.json").read_text()) == json.loads((ref / "ranks.json").read_text())
    a, b = dict(scalars(ref)["1_train/loss"]), dict(scalars(cut)["1_train/loss"])
    assert sorted(b) == list(range(1, 5 * SPE + 1))
    assert max(abs(a[s] - b[s]) for s in range(1, STOP + 1)) == 0.0  # the same run up to the stop
    worst = max(abs(a[s] - b[s]) for s in range(STOP + 1, 5 * SPE + 1))
    assert worst <= MICRO_TOL, worst
    assert abs(summary(cut)["final_val_top1"] - summary(ref)["final_val_top1"]) <= 1.0
