"""Faults on real 2-rank jobs: SIGKILL in every phase, a kill inside a save, a world-size change on resume,
non-finite steps, a hung rank, a full disk. Faults come from PRELORA_FAULTS (prelora_ds/faults.py): the
process really dies, hangs or gets a NaN. Kill steps are drawn at random; the seed is printed and can be
fixed with PRELORA_FAULT_SEED to replay a failure.
"""

from __future__ import annotations

import json
import os
import random
import resource
import sys
import time

import pytest
import torch
from conftest import BIN, RELORA_RUN, ROOT, SWITCH_RUN, TINY, deepspeed_cmd, run, scalars, summary

pytestmark = pytest.mark.launch

SEED = int(os.environ.get("PRELORA_FAULT_SEED", random.SystemRandom().randrange(10**6)))
print(f"PRELORA_FAULT_SEED={SEED}", file=sys.stderr)
FP32_RESUME_TOL = 1e-4  # same data order, RNG and fp32 masters: the curves agree to float noise
_ports = iter(range(29700, 29800))


def launch(out, *args, world=2, faults=None, check=True, **popen):
    """The same command every time (plus --resume when asked); 1 rank is a plain process."""
    if world == 2:
        cmd = deepspeed_cmd("--output_dir", str(out), *args, port=next(_ports))
    else:
        cmd = [str(BIN / "python"), "-m", "prelora_ds.train", "--output_dir", str(out), *args]
    t0 = time.perf_counter()
    proc = run(cmd, check=check, env={"PRELORA_FAULTS": faults} if faults else None, timeout=300, **popen)
    proc.wall_s = time.perf_counter() - t0
    return proc


def latest(out) -> str:
    return (out / "checkpoints" / "latest").read_text().strip()


def saved_loop(out, step: int) -> dict:
    return json.loads((out / "checkpoints" / f"step{step:08d}" / "trainer_state.json").read_text())["loop"]


def losses(out) -> dict[int, float]:
    return dict(scalars(out)["train/loss"])


def worst_diff(a: dict[int, float], b: dict[int, float], steps) -> float:
    return max(abs(a[s] - b[s]) for s in steps)


def timeline(out) -> list[tuple[str, int, int]]:
    return [(p["name"], p["start_step"], p["end_step"]) for p in summary(out)["phases"]]


def phase_at(step: int) -> str:
    """Phase recorded in a checkpoint of the switch reference (the switch checkpoints carry the new phase)."""
    return "full" if step < 12 else "warmup" if step < 20 else "lora"


# ------------------------------------------------------------------ kill -9 in every phase, and inside a save
@pytest.fixture(scope="module")
def kill_chain(tmp_path_factory):
    """One run killed five times: inside the save of step 10, then at random steps in full, warmup and lora."""
    rng = random.Random(SEED)
    out = tmp_path_factory.mktemp("kill") / "run"
    cmd = [*SWITCH_RUN, "--train.checkpoint_every_steps", "5"]
    kills = [rng.randint(6, 11), rng.randint(13, 19), rng.randint(21, 39)]
    launches = [launch(out, *cmd, faults="kill_in_save@10:1", check=False)]
    after_save_kill = {
        "latest": latest(out),
        "incomplete": not (out / "checkpoints" / "step00000010" / "COMPLETE").exists(),
        "partial_files": sorted(p.name for p in (out / "checkpoints" / "step00000010").iterdir()),
    }
    for i, step in enumerate(kills):
        launches.append(launch(out, *cmd, "--resume", faults=f"kill@{step}:{i % 2}", check=False))
    launches.append(launch(out, *cmd, "--resume"))
    return out, kills, launches, after_save_kill


def test_kill_inside_save_leaves_latest_on_the_complete_checkpoint(kill_chain):
    out, _, launches, state = kill_chain
    assert launches[0].returncode != 0, "the launcher must end the job when a rank dies"
    assert state["latest"] == "step00000005" and state["incomplete"]
    assert any(name.endswith("_states.pt") for name in state["partial_files"])  # DeepSpeed had written files
    assert "skipping incomplete checkpoint(s) step00000010" in launches[1].stdout
    assert f"resuming from {out / 'checkpoints' / 'step00000005'}" in launches[1].stdout


def test_kill_in_full_warmup_lora_resumes_from_the_last_checkpoint(kill_chain):
    out, kills, launches, _ = kill_chain
    saves = [5, 10, 12, 15, 20, 22, 25, 30, 35]  # every 5 steps, the two switches, the epoch end (22 steps)
    for kill, killed, resumed in zip(kills, launches[1:4], launches[2:5], strict=True):
        assert killed.returncode != 0, f"seed {SEED}: the job killed at step {kill} did not fail"
        assert f"SIGKILL after step {kill}" in killed.stdout
        resume_step = max(s for s in saves if s <= kill)
        assert f"resuming from {out / 'checkpoints' / f'step{resume_step:08d}'}" in resumed.stdout, (SEED, kill)
        assert saved_loop(out, resume_step)["phase"] == phase_at(resume_step)
    assert [phase_at(k) for k in kills] == ["full", "warmup", "lora"]


def test_killed_run_matches_the_uninterrupted_one(kill_chain, switch_reference):
    out = kill_chain[0]
    assert timeline(out) == timeline(switch_reference)
    assert json.loads((out / "ranks.json").read_text()) == json.loads((switch_reference / "ranks.json").read_text())
    a, b = losses(switch_reference), losses(out)
    assert sorted(b) == list(range(1, 41))
    assert worst_diff(a, b, range(1, 41)) <= FP32_RESUME_TOL, SEED
    lr_a, lr_b = dict(scalars(switch_reference)["train/lr"]), dict(scalars(out)["train/lr"])
    assert worst_diff(lr_a, lr_b, range(1, 41)) <= 1e-12


def test_kill_mid_relora_cycle_keeps_merges_and_schedule(tmp_path, relora_reference):
    rng = random.Random(SEED + 1)
    out = tmp_path / "run"
    cmd = [*RELORA_RUN, "--train.checkpoint_every_steps", "5"]
    kill = rng.randint(11, 13)  # relora started at 4, merges after 9 and 14: 10-13 is mid-cycle
    killed = launch(out, *cmd, faults=f"kill@{kill}:1", check=False)
    assert killed.returncode != 0
    state = saved_loop(out, 10)
    assert state["phase"] == "relora" and state["relora_merges"] == 1
    resumed = launch(out, *cmd, "--resume")
    assert f"resuming from {out / 'checkpoints' / 'step00000010'}" in resumed.stdout
    assert summary(out)["relora_merges"] == summary(relora_reference)["relora_merges"]
    assert timeline(out) == timeline(relora_reference)
    assert worst_diff(losses(relora_reference), losses(out), range(1, 61)) <= FP32_RESUME_TOL, (SEED, kill)


# ------------------------------------------------------------------ 2 ranks -> 1 -> 2 -> 1
@pytest.fixture(scope="module")
def elastic_ds(tmp_path_factory):
    """The demo's DeepSpeed config with the global batch fixed (64) instead of the accumulation: DeepSpeed
    derives accumulation 1 on 2 ranks and 2 on 1 rank, so steps and data are the same at either size."""
    cfg = json.loads((ROOT / "ds_configs" / "cpu_zero2_fp32.json").read_text())
    cfg.pop("gradient_accumulation_steps")
    cfg["train_batch_size"] = 64
    path = tmp_path_factory.mktemp("ds") / "elastic.json"
    path.write_text(json.dumps(cfg))
    return str(path)


@pytest.fixture(scope="module")
def world_chain(tmp_path_factory, elastic_ds):
    out = tmp_path_factory.mktemp("world") / "run"
    cmd = [*SWITCH_RUN, "--deepspeed_config", elastic_ds]
    return out, [
        launch(out, *cmd, "--train.stop_at_step", "8", world=2),  # saved in full by 2
        launch(out, *cmd, "--train.stop_at_step", "16", "--resume", world=1),  # full on 1, saves in warmup
        launch(out, *cmd, "--train.stop_at_step", "26", "--resume", world=2),  # warmup on 2, saves in lora
        launch(out, *cmd, "--resume", world=1),  # lora on 1, to the end
    ]


WORLD_TOL = 2e-3  # another reduction order (2 ranks x 1 micro batch vs 1 rank x 2): fp32 rounding only


def test_world_size_change_in_every_phase(world_chain, switch_reference):
    out, launches = world_chain
    expected = [(8, 2, 1, "full"), (16, 1, 2, "warmup"), (26, 2, 1, "lora")]
    for (step, before, after, phase), resumed in zip(expected, launches[1:], strict=True):
        assert saved_loop(out, step)["phase"] == phase
        assert (
            f"resuming step{step:08d}, saved by {before} rank(s), on {after} rank(s): converted to a DeepSpeed "
            "universal checkpoint" in resumed.stdout
        )
        assert "global batch 64" in resumed.stdout
    assert timeline(out) == timeline(switch_reference)
    assert summary(out)["world_size"] == 1
    assert json.loads((out / "ranks.json").read_text()) == json.loads((switch_reference / "ranks.json").read_text())
    a, b = losses(switch_reference), losses(out)
    assert worst_diff(a, b, range(1, 41)) <= WORLD_TOL


def test_world_size_change_in_relora(tmp_path, elastic_ds, relora_reference):
    out = tmp_path / "run"
    cmd = [*RELORA_RUN, "--deepspeed_config", elastic_ds]
    launch(out, *cmd, "--train.stop_at_step", "12", world=2)
    resumed = launch(out, *cmd, "--resume", world=1)
    assert "saved by 2 rank(s), on 1 rank(s)" in resumed.stdout
    assert saved_loop(out, 12)["phase"] == "relora"
    assert summary(out)["relora_merges"] == summary(relora_reference)["relora_merges"]
    assert timeline(out) == timeline(relora_reference)
    assert worst_diff(losses(relora_reference), losses(out), range(1, 61)) <= WORLD_TOL


def test_resume_refuses_another_layout_before_starting(world_chain, elastic_ds):
    out = world_chain[0]
    proc = launch(out, *SWITCH_RUN, "--deepspeed_config", elastic_ds, "--resume", "--model.kwargs",
                  "{img_size: 16, patch_size: 4, depth: 4}", world=1, check=False)
    assert proc.returncode == 2
    assert (
        f"checkpoint {out / 'checkpoints' / 'step00000040'} does not fit this run: model.kwargs was "
        "{'img_size': 16, 'patch_size': 4, 'depth': 6}, now {'img_size': 16, 'patch_size': 4, 'depth': 4}. "
        "Resume with the values it was saved with, or pass another --output_dir to start a new run." in proc.stderr
    )
    proc = launch(out, *SWITCH_RUN, "--resume", world=1, check=False)  # accumulation 1 on 1 rank: batch 32
    assert proc.returncode == 2
    assert "the global batch (train_batch_size) was 64, now 32: set \"train_batch_size\": 64" in proc.stderr


# ------------------------------------------------------------------ non-finite steps, hung rank, full disk
def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path):
    out = tmp_path / "run"
    proc = launch(out, *TINY, "--prelora.enabled", "false", "--train.max_steps", "20",
                  "--train.checkpoint_every_steps", "5", "--train.max_bad_steps", "3",
                  faults="nan@3:1,nan@7,nan@8:0,nan@9", check=False)
    assert proc.returncode != 0
    ckpt = out / "checkpoints"
    assert (
        "steps 7-9: 3 consecutive steps with a non-finite loss or gradient (train.max_bad_steps=3); stopping "
        f"without saving. The last good checkpoint is {ckpt / 'step00000005'}." in proc.stderr
    )
    assert latest(out) == "step00000005" and not (ckpt / "step00000009").exists()
    assert dict(scalars(out)["train/skipped_steps"]) == {3: 1, 7: 2, 8: 3, 9: 4}
    loss = losses(out)
    assert all(loss[s] == loss[s] for s in (1, 2, 4, 5, 6))  # finite again after the single bad step
    # the NaN of step 3 never reached the weights
    states = torch.load(ckpt / "step00000005" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert all(torch.isfinite(t).all() for t in states.values())


def test_hung_rank_times_out_naming_the_collective(tmp_path):
    out = tmp_path / "run"
    t0 = time.perf_counter()
    proc = launch(out, *TINY, "--prelora.enabled", "false", "--train.max_steps", "20",
                  "--train.collective_timeout_s", "10", faults="hang@4:1", check=False)
    assert proc.returncode != 0
    assert "rank 1: hanging after step 4" in proc.stdout
    assert (
        "rank 0: the all-reduce of the logged loss at step 4 timed out after train.collective_timeout_s=10 s "
        "waiting for another rank (dead, hung or cut off)" in proc.stderr
    )
    assert time.perf_counter() - t0 < 120


def test_disk_full_during_save_keeps_the_last_complete_checkpoint(tmp_path):
    out = tmp_path / "run"
    cmd = [*TINY, "--prelora.enabled", "false", "--train.max_steps", "12", "--train.checkpoint_every_steps", "5"]
    launch(out, *cmd, "--train.stop_at_step", "5")

    def small_files():  # every write past 256 KiB fails with EFBIG, like a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))

    full = launch(out, *cmd, "--resume", check=False, preexec_fn=small_files)
    assert full.returncode != 0
    assert f"could not write checkpoint {out / 'checkpoints' / 'step00000010'}" in full.stderr
    assert "the last complete one is step00000005. Free disk space" in full.stderr
    assert latest(out) == "step00000005"
    assert not (out / "checkpoints" / "step00000010" / "COMPLETE").exists()
    again = launch(out, *cmd, "--resume")
    assert "skipping incomplete checkpoint(s) step00000010" in again.stdout
    assert summary(out)["steps"] == 12 and latest(out) == "step00000012"
    kept = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step"))
    assert kept == ["step00000010", "step00000012"]  # keep_checkpoints=2; the partial one was replaced


def test_hostfile_line_without_slots_is_refused_by_the_launcher(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost\n")
    proc = run([str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", "0",
                "--module", "prelora_ds.train", "--recipe", "recipes/demo.yaml"], check=False, timeout=120)
    assert proc.returncode != 0
    assert "Hostfile contains a bad entry: localhost, unable to proceed with launching" in proc.stderr
