"""Checkpoint bookkeeping without a job: resume choice, pruning, layout checks, disk space, fault specs."""

from __future__ import annotations

import shutil

import pytest
import torch

from prelora_ds.checkpoint import storage
from prelora_ds.config.recipe import apply_overrides, build_config
from prelora_ds.config.sections import RunConfig
from prelora_ds.errors import CheckpointWriteError
from prelora_ds.testing import faults


def make(ckpt, step, complete=True):
    tag = ckpt / storage.tag_for(step)
    tag.mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        (tag / storage.COMPLETE_FILE).write_text(tag.name)
    return tag


def test_resume_skips_an_interrupted_save_and_says_so(tmp_path):
    make(tmp_path, 5)
    make(tmp_path, 10, complete=False)
    (tmp_path / "latest").write_text("step00000005")
    tag, msg = storage.find_resume(tmp_path)
    assert tag == "step00000005"
    assert msg == (
        "skipping incomplete checkpoint(s) step00000010 (a save was interrupted: no COMPLETE marker); "
        f"resuming from {tmp_path / 'step00000005'}"
    )


def test_resume_without_latest_takes_newest_complete(tmp_path):
    make(tmp_path, 5)
    make(tmp_path, 7)
    tag, msg = storage.find_resume(tmp_path)
    assert tag == "step00000007" and msg.startswith("no 'latest' file; resuming from the newest complete")


def test_only_incomplete_checkpoints_start_from_zero(tmp_path):
    make(tmp_path, 5, complete=False)
    tag, msg = storage.find_resume(tmp_path)
    assert tag is None and "skipping incomplete checkpoint(s) step00000005" in msg and "starting from step 0" in msg


def test_prune_keeps_newest_complete_and_removes_stale_partials(tmp_path):
    for step in (5, 10, 15):
        make(tmp_path, step)
    make(tmp_path, 12, complete=False)  # older than the newest complete: a leftover
    make(tmp_path, 20, complete=False)  # newer: may be a save in progress, untouched
    for tag in ("step00000005_universal", "step00000015_universal"):  # conversions are never resume points
        (tmp_path / tag).mkdir()
        (tmp_path / tag / storage.COMPLETE_FILE).write_text(tag)
    assert storage.complete_tags(tmp_path) == ["step00000005", "step00000010", "step00000015"]
    storage.prune(tmp_path, keep=2)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["step00000010", "step00000015", "step00000015_universal", "step00000020"]


def cfg(**overrides):
    base = RunConfig().to_dict()
    return build_config(apply_overrides(base, overrides))


def saved_state(c: RunConfig, **extra):
    return {"config": c.to_dict(), "model": c.model.name, "num_classes": 10, "train_batch_size": 64,
            "loop": {"phase": "full"}, **extra}


def test_layout_mismatch_names_each_difference():
    old = cfg(**{"model.kwargs": {"depth": 6}})
    new = cfg(**{"model.kwargs": {"depth": 4}, "prelora.target_modules": r"blocks\.\d+\.attn\.qkv"})
    problems = storage.layout_mismatch(saved_state(old), new, 100, {"train_batch_size": 32})
    assert problems == [
        "model.kwargs was {'depth': 6}, now {'depth': 4}",
        "prelora.target_modules was 'blocks\\\\.\\\\d+\\\\.(attn\\\\.(qkv|proj)|mlp\\\\.fc[12])', now "
        "'blocks\\\\.\\\\d+\\\\.attn\\\\.qkv'",
        "the data had 10 classes, now 100",
        'the global batch (train_batch_size) was 64, now 32: set "train_batch_size": 64 in the DeepSpeed config '
        "and DeepSpeed derives the accumulation for this world size",
    ]


def test_layout_mismatch_relora_rank_only_matters_in_relora():
    old, new = cfg(**{"relora.rank": 16}), cfg(**{"relora.rank": 32})
    assert storage.layout_mismatch(saved_state(old), new, 10, {"train_batch_size": 64}) == []
    relora = saved_state(old, loop={"phase": "relora"})
    assert storage.layout_mismatch(relora, new, 10, {"train_batch_size": 64}) == [
        "relora.rank was 16, now 32 (the checkpoint is in phase relora)"
    ]


def test_free_space_error_and_warning_use_the_real_disk(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(OSError, match=r"has [\d.]+ GiB free, but one checkpoint of this model needs about"):
        storage.check_free_space(tmp_path / "new" / "run", free * 2, keep=2)
    warning = storage.check_free_space(tmp_path, free // 2, keep=2)
    assert warning and "train.keep_checkpoints=2 needs about" in warning
    assert storage.check_free_space(tmp_path, 1, keep=2) is None


def test_estimate_covers_weights_masters_and_adam():
    assert storage.estimate_bytes(1000, 2) == int(1000 * 14 * 1.25)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", []),
        ("kill@12:1", [faults.Fault("kill", 12, 1)]),
        ("nan@3, hang@8:0", [faults.Fault("nan", 3, None), faults.Fault("hang", 8, 0)]),
        ("kill_in_save@10", [faults.Fault("kill_in_save", 10, None)]),
        ("usr1_self@8:0,term_in_save@8:0", [faults.Fault("usr1_self", 8, 0), faults.Fault("term_in_save", 8, 0)]),
    ],
)
def test_fault_specs(text, expected):
    assert faults.parse(text) == expected


@pytest.mark.parametrize("text", ["kill", "kill@", "explode@3", "kill@3:x", "kill@-1"])
def test_bad_fault_specs(text):
    with pytest.raises(ValueError, match=r"PRELORA_FAULTS: cannot read .* write KIND@STEP\[:RANK\]"):
        faults.parse(text)


def test_a_timeout_inside_a_save_is_not_called_a_disk_error(tmp_path):
    """A rank that stops answering inside DeepSpeed's save barrier raises a store/collective timeout; it used to be
    reported as 'could not write checkpoint ... free disk space'."""
    from datetime import timedelta

    from prelora_ds.distributed import collectives

    with pytest.raises(RuntimeError) as timeout:  # a real rendezvous timeout: 1 of 2 ranks ever arrives
        torch.distributed.TCPStore("127.0.0.1", 0, world_size=2, is_master=True, timeout=timedelta(seconds=1))
    assert collectives.is_timeout(timeout.value)
    assert storage.write_error(timeout.value, tmp_path / "step00000004", 0) is None
    try:  # a real write failure: the directory is a file
        (tmp_path / "blocked").write_text("")
        torch.save({}, tmp_path / "blocked" / "rank0.pt")
    except (OSError, RuntimeError) as exc:
        error = storage.write_error(exc, tmp_path / "step00000004", 0)
    assert isinstance(error, CheckpointWriteError) and "Free disk space" in str(error)
