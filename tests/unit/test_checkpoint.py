"""Checkpoint bookkeeping without a job: resume choice, manifests and damaged files, pruning, layout checks, disk
space, fault specs."""

from __future__ import annotations

import shutil
import zlib

import pytest
import torch

from prelora_ds.checkpoint import manifest, storage
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
    choice = storage.find_resume(tmp_path)
    assert choice.tag == "step00000005"
    assert choice.message == (
        "skipping incomplete checkpoint(s) step00000010 (a save was interrupted: no COMPLETE marker); "
        f"resuming from {tmp_path / 'step00000005'}"
    )


def test_resume_without_latest_takes_newest_complete(tmp_path):
    make(tmp_path, 5)
    make(tmp_path, 7)
    choice = storage.find_resume(tmp_path)
    assert choice.tag == "step00000007"
    assert choice.message.startswith("no 'latest' file; resuming from the newest complete")


def test_only_incomplete_checkpoints_start_from_zero(tmp_path):
    make(tmp_path, 5, complete=False)
    choice = storage.find_resume(tmp_path)
    assert choice.tag is None and choice.error is None
    assert "skipping incomplete checkpoint(s) step00000005" in choice.message
    assert "starting from step 0" in choice.message


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


def test_the_first_save_after_a_fallback_drops_the_skipped_checkpoints_it_passed(tmp_path):
    """Resumed at 15 past a damaged 16; the first save (20) drops 16, which would otherwise count among the newest
    two and push out 15; a later save keeps what this run saved."""
    for step in (10, 15, 16, 20):
        make(tmp_path, step)
    storage.prune(tmp_path, keep=2, current="step00000020", resumed="step00000015")
    assert storage.complete_tags(tmp_path) == ["step00000015", "step00000020"]
    make(tmp_path, 22)
    storage.prune(tmp_path, keep=2, current="step00000022")
    assert storage.complete_tags(tmp_path) == ["step00000020", "step00000022"]


# ------------------------------------------------------------------ manifests: damaged checkpoints
ZERO1 = "zero_pp_rank_1_mp_rank_00_optim_states.pt"


def make_verified(ckpt, step, unclaimed=False):
    """A checkpoint as `storage.save` leaves it for 2 ranks: torch files (one 1.2 MB tensor file), the loop state,
    a manifest gathered from both ranks' entries (plus rank 0's sweep of files no rank claimed), COMPLETE, latest."""
    tag = ckpt / storage.tag_for(step)
    tag.mkdir(parents=True)
    weights = {"w": torch.arange(300_000, dtype=torch.float32) + step}
    torch.save(weights, tag / "mp_rank_00_model_states.pt")
    ranks = {0: [tag / "mp_rank_00_model_states.pt", tag / "trainer_state.json"], 1: [tag / ZERO1]}
    for r in (0, 1):
        torch.save({"exp_avg": torch.full((1000,), float(r))}, tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
        torch.save({"rng": r}, tag / f"rank{r}.pt")
        ranks[r] += [tag / f"rank{r}.pt"]
    ranks[0].append(tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    (tag / "trainer_state.json").write_text(f'{{"loop": {{"step": {step}}}}}')
    if unclaimed:
        (tag / "zero_to_fp32.py").write_text("# DeepSpeed's recovery script, copied by rank 0\n")
    gathered = [manifest.describe(tag, ranks[r], r) for r in (0, 1)]
    (tag / manifest.MANIFEST_FILE).write_text(manifest.to_json(manifest.complete(tag, gathered)))
    (tag / storage.COMPLETE_FILE).write_text(tag.name)
    (ckpt / "latest").write_text(tag.name)
    return tag


def test_manifest_lists_every_file_with_its_writer_and_verifies(tmp_path):
    tag = make_verified(tmp_path, 5, unclaimed=True)
    entries = {e["path"]: e for e in manifest.read(tag)}
    on_disk = {p.name for p in tag.iterdir()} - {manifest.MANIFEST_FILE, storage.COMPLETE_FILE}
    assert set(entries) == on_disk and len(on_disk) == 7
    assert entries[ZERO1]["rank"] == 1 and entries["zero_to_fp32.py"]["rank"] == 0  # rank 0 sweeps the rest
    assert entries["rank1.pt"]["size"] == (tag / "rank1.pt").stat().st_size
    assert entries["rank1.pt"]["crc32"] == f"{zlib.crc32((tag / 'rank1.pt').read_bytes()):08x}"
    assert manifest.verify(tag) == []


def test_a_truncated_file_is_named_with_its_size(tmp_path):
    tag = make_verified(tmp_path, 5)
    size = (tag / ZERO1).stat().st_size
    faults.damage(tag / ZERO1, "truncate")
    assert manifest.verify(tag) == [f"{ZERO1}: size 1000 bytes, expected {size}"]
    with pytest.raises(RuntimeError, match="failed finding central directory"):  # what the resume died of before
        torch.load(tag / ZERO1, weights_only=True)


def test_one_flipped_bit_in_a_tensor_is_a_checksum_mismatch(tmp_path):
    tag = make_verified(tmp_path, 5)
    name = "mp_rank_00_model_states.pt"
    expected = manifest.read(tag)[[e["path"] for e in manifest.read(tag)].index(name)]["crc32"]
    faults.damage(tag / name, "flip")
    # torch.load does not notice: one weight has another value
    changed = torch.load(tag / name, weights_only=True)["w"] != torch.arange(300_000, dtype=torch.float32) + 5
    assert changed.sum() == 1
    problems = manifest.verify(tag)
    assert problems == [f"{name}: checksum mismatch (crc32 {manifest.crc32(tag / name)}, expected {expected})"]
    # spread over 2 ranks, exactly one of them reads the file and reports it
    assert manifest.check(tag, manifest.read(tag), 0, 2) + manifest.check(tag, manifest.read(tag), 1, 2) == problems
    assert manifest.verify(tag, checksum_up_to=manifest.QUICK_BYTES) == []  # the pre-flight's quick look: sizes


def test_share_gives_the_largest_file_first_to_the_least_loaded_rank():
    entries = [{"path": p, "size": n} for p, n in (("a", 10), ("b", 100), ("c", 60), ("d", 50))]
    assert [[e["path"] for e in manifest.share(entries, r, 2)] for r in (0, 1)] == [["b", "a"], ["c", "d"]]
    assert [e["path"] for e in manifest.share(entries, 0, 1)] == ["b", "c", "d", "a"]


def test_an_unreadable_manifest_is_damage(tmp_path):
    tag = make_verified(tmp_path, 5)
    (tag / manifest.MANIFEST_FILE).write_text('{"algorithm": "crc32", "files": [')
    assert manifest.verify(tag)[0].startswith(f"{manifest.MANIFEST_FILE} cannot be read (")


def test_resume_falls_back_to_the_previous_checkpoint_that_verifies_naming_the_file(tmp_path):
    make_verified(tmp_path, 5)
    tag = make_verified(tmp_path, 10)
    faults.damage(tag / ZERO1, "truncate")
    choice = storage.find_resume(tmp_path)
    assert choice.tag == "step00000005" and choice.error is None and choice.notes == []
    size = (tmp_path / "step00000005" / ZERO1).stat().st_size  # the same content in both
    assert choice.warnings == [
        f"checkpoint {tag} is damaged: {ZERO1}: size 1000 bytes, expected {size}; resuming step00000005 instead (the "
        "next save removes the damaged one)"
    ]
    assert choice.message == f"resuming from the newest complete checkpoint that verifies {tmp_path / 'step00000005'}"


def test_a_checkpoint_without_manifest_is_resumed_unchecked_with_a_note(tmp_path):
    old = make(tmp_path, 5)  # saved before checkpoints had a manifest
    (tmp_path / "latest").write_text(old.name)
    choice = storage.find_resume(tmp_path)
    assert (choice.tag, choice.warnings, choice.message) == (old.name, [], f"resuming from {old}")
    assert choice.notes == [
        f"checkpoint {old} has no MANIFEST.json (saved before checkpoints had one), so it cannot be verified; "
        "resuming it unchecked."
    ]
    faults.damage(make_verified(tmp_path, 10) / "rank0.pt", "flip")  # a newer, damaged one falls back to it
    choice = storage.find_resume(tmp_path)
    assert choice.tag == old.name and len(choice.warnings) == 1 and "rank0.pt: checksum mismatch" in choice.warnings[0]


def test_every_checkpoint_damaged_is_an_error_naming_each_not_a_fresh_start(tmp_path):
    faults.damage(make_verified(tmp_path, 5) / "trainer_state.json", "flip")
    faults.damage(make_verified(tmp_path, 10) / ZERO1, "truncate")
    choice = storage.find_resume(tmp_path)
    assert choice.tag is None and len(choice.warnings) == 2
    assert choice.error.startswith(
        f"no checkpoint in {tmp_path} can be resumed: every complete one is damaged (step00000010: {ZERO1}: size "
        "1000 bytes, expected "
    )
    assert "; step00000005: trainer_state.json: checksum mismatch (crc32 " in choice.error
    assert choice.error.endswith(
        "Nothing was loaded. Restore them from a copy, or move the damaged folders out of the way (with no checkpoint "
        "left, --resume starts from step 0), then run the same command again."
    )


def test_pruning_after_a_fallback_keeps_the_verified_checkpoint(tmp_path):
    """keep_checkpoints=1, resumed from step 22 past a damaged step 40: the save of step 25 used to be pruned as
    older than step 40, leaving only the damaged checkpoint."""
    make_verified(tmp_path, 22)
    faults.damage(make_verified(tmp_path, 40) / ZERO1, "truncate")
    assert storage.find_resume(tmp_path).tag == "step00000022"
    make_verified(tmp_path, 25)  # the resumed run's first save, then its pruning
    storage.prune(tmp_path, keep=1, current="step00000025")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step00000025"]
    choice = storage.find_resume(tmp_path)
    assert (choice.tag, choice.warnings) == ("step00000025", [])


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
