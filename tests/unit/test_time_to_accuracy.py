"""`prelora time-to-accuracy` on tiny fake runs (summary.json and config.yaml in the shape a run writes them): the
pairing by seed, the first validation at the target, the ratios and the means, the files the command and
tools/run_study.py write."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from prelora_ds.cli import CommandError, main
from prelora_ds.cli.time_to_accuracy import load_run, pair_by_seed, pair_stats, run_seed, summarize
from prelora_ds.testing.harness import load_tool

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def fake_run(run_dir: Path, val: list[tuple[float, float]], wall_time_s: float, steps: dict[str, float],
             switch_step: int | None = None, seed: int | None = None) -> Path:
    """A finished run: one validation every 10 steps as (wall_s, top1); the phases' median step times in order,
    the switch into the second at `switch_step`; config.yaml's train.seed when `seed` is given."""
    run_dir.mkdir(parents=True)
    end = 10 * len(val)
    starts = [0, switch_step, (switch_step or 0) + 5][: len(steps)]  # full, warmup (5 steps), lora
    summary = {
        "phases": [{"name": name, "start_step": start, "end_step": stop, "trainable_params": 100,
                    "median_step_s": step_s}
                   for (name, step_s), start, stop in zip(steps.items(), starts, [*starts[1:], end], strict=True)],
        "switch_step": switch_step, "switch_epoch": switch_step // 10 - 1 if switch_step else None,
        "final_val_top1": val[-1][1],
        "val": [{"top1": top1, "step": 10 * (i + 1), "epoch": i, "wall_s": wall} for i, (wall, top1) in enumerate(val)],
        "steps": end, "epochs": len(val), "wall_time_s": wall_time_s, "steps_per_epoch": 10,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary))
    if seed is not None:
        (run_dir / "config.yaml").write_text(f"model:\n  name: vit_tiny_patch16_224\ntrain:\n  seed: {seed}\n")
    return run_dir


@pytest.fixture
def study(tmp_path) -> dict[str, Path]:
    """Seed 0: full reaches its target 95 exactly at step 30, PreLoRA at step 30 after a 94.99 at step 20. Seed 1:
    the full run's folder has no seed suffix (config.yaml says 1), PreLoRA has no config.yaml (its suffix says 1)
    and never reaches 98."""
    runs = tmp_path / "runs"
    return {
        "full_s0": fake_run(runs / "full_s0", [(10, 50), (20, 80), (30, 95), (40, 90), (50, 96)], 64,
                            {"full": 0.25}, seed=0),
        "relaxed_s0": fake_run(runs / "relaxed_s0", [(8, 60), (16, 94.99), (24, 97), (32, 97)], 48,
                               {"full": 0.375, "warmup": 0.5, "lora": 0.125}, switch_step=20, seed=0),
        "full_s1": fake_run(runs / "baseline_a", [(10, 70), (20, 90), (40, 99)], 50, {"full": 0.5}, seed=1),
        "relaxed_s1": fake_run(runs / "relaxed_s1", [(10, 80), (20, 97.5), (30, 97.9)], 40,
                               {"full": 0.5, "warmup": 0.75, "lora": 0.25}, switch_step=10),
    }


def pairs_of(study, margin=1.0):
    full = [load_run(study[k], k) for k in ("full_s0", "full_s1")]
    cands = [load_run(study[k], k) for k in ("relaxed_s1", "relaxed_s0")]  # out of seed order
    return [pair_stats(b, c, margin) for b, c in pair_by_seed(full, cands)]


def test_seed_from_config_then_the_folder_suffix(study, tmp_path):
    assert run_seed(study["full_s1"]) == 1  # baseline_a: config.yaml
    assert run_seed(study["relaxed_s1"]) == 1  # no config.yaml: _s1
    (study["relaxed_s0"] / "config.yaml").write_text("train:\n  seed: 7\n")
    assert run_seed(study["relaxed_s0"]) == 7  # the config wins over the suffix
    bare = fake_run(tmp_path / "bare", [(1, 1)], 1, {"full": 1})
    with pytest.raises(CommandError, match="no train.seed in config.yaml and no _s<seed> suffix"):
        load_run(bare, "bare")


def test_first_validation_at_the_target_and_never(study):
    p0, p1 = pairs_of(study)
    assert (p0.seed, p0.target, p1.seed, p1.target) == (0, 95.0, 1, 98.0)
    assert (p0.baseline.label, p0.candidate.label, p1.baseline.label) == ("full_s0", "relaxed_s0", "full_s1")
    # at the target counts (95 at step 30); just below it does not (94.99 at step 20)
    assert (p0.baseline.target_step, p0.baseline.target_wall_s, p0.baseline.target_top1) == (30, 30, 95)
    assert (p0.candidate.target_step, p0.candidate.target_wall_s, p0.candidate.target_top1) == (30, 24, 97)
    assert (p1.baseline.target_step, p1.baseline.target_wall_s) == (30, 40)
    assert (p1.candidate.target_step, p1.candidate.target_wall_s) == (None, None)
    assert (p0.target_ratio, p1.target_ratio) == (0.8, None)
    # a wider margin: 97 for seed 1, which PreLoRA reaches at step 20
    q1 = pairs_of(study, margin=2.0)[1]
    assert (q1.target, q1.candidate.target_step, q1.candidate.target_wall_s, q1.target_ratio) == (97.0, 20, 20, 0.5)


def test_ratios_against_the_paired_full_run(study):
    p0, p1 = pairs_of(study)
    assert (p0.wall_ratio, p1.wall_ratio) == (0.75, 0.8)
    assert p0.candidate.step_ratio == {"full": 1.5, "warmup": 2.0, "lora": 0.5}  # over full_s0's 0.25 s
    assert p1.candidate.step_ratio == {"full": 1.0, "warmup": 1.5, "lora": 0.5}  # over baseline_a's 0.5 s
    assert p0.baseline.step_ratio == {"full": 1.0}
    assert (p0.candidate.switch_step, p0.baseline.switch_step, p1.candidate.final_val_top1) == (20, None, 97.9)


def test_means_and_spread_over_the_pairs(study):
    s = summarize(pairs_of(study))
    assert s["pairs"] == 2
    assert s["wall_ratio"] == {"mean": pytest.approx(0.775), "min": 0.75, "max": 0.8, "n": 2}
    assert s["target_ratio"] == {"mean": 0.8, "min": 0.8, "max": 0.8, "n": 1}  # seed 1 never reached it
    assert s["baseline"]["wall_time_s"] == {"mean": 57, "min": 50, "max": 64, "n": 2}
    assert s["baseline"]["target_wall_s"] == {"mean": 35, "min": 30, "max": 40, "n": 2}
    assert s["candidate"]["target_wall_s"] == {"mean": 24, "min": 24, "max": 24, "n": 1}
    assert s["candidate"]["switch_step"] == {"mean": 15, "min": 10, "max": 20, "n": 2}
    assert s["baseline"]["switch_step"] is None
    assert s["candidate"]["final_val_top1"] == {"mean": pytest.approx(97.45), "min": 97, "max": 97.9, "n": 2}
    assert s["candidate"]["step_ratio"]["warmup"] == {"mean": 1.75, "min": 1.5, "max": 2.0, "n": 2}
    assert list(s["candidate"]["step_ratio"]) == ["full", "warmup", "lora"]
    assert s["target"] == {"mean": 96.5, "min": 95.0, "max": 98.0, "n": 2}


def test_pairing_refuses_a_missing_or_repeated_seed(study, tmp_path):
    full = [load_run(study["full_s0"], "full_s0")]
    cands = [load_run(study[k], k) for k in ("relaxed_s0", "relaxed_s1")]
    with pytest.raises(CommandError, match=r"no baseline run of the seed of relaxed_s1 \(seed 1\)"):
        pair_by_seed(full, cands)
    other = fake_run(tmp_path / "medium_s0", [(1, 1)], 1, {"full": 1}, seed=0)
    with pytest.raises(CommandError, match="several candidate runs of seed 0"):
        pair_by_seed(full, [cands[0], load_run(other, "medium_s0")])
    assert pair_by_seed([*full, load_run(study["full_s1"], "full_s1")], cands[:1]) == [(full[0], cands[0])]


def test_the_command_prints_the_table_and_writes_the_files(study, tmp_path, capsys):
    out = tmp_path / "out"
    args = [str(study["relaxed_s1"]), str(study["relaxed_s0"]), "--baseline", str(study["full_s0"]),
            str(study["full_s1"])]
    assert main(["time-to-accuracy", *args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert lines[0].startswith("| seed | full wall (s) | full top-1 | relaxed wall (s) | switch step |")
    assert lines[0].endswith("| full step / full's | warmup step / full's | lora step / full's |")
    assert lines[2] == ("| 0 | 64.0 | 96.00 | 48.0 | 20 | 97.00 | 0.750 | 95.00 | 30.0 (step 30) | 24.0 (step 30) "
                        "| 0.800 | 1.50 | 2.00 | 0.50 |")
    assert lines[3] == ("| 1 | 50.0 | 99.00 | 40.0 | 10 | 97.90 | 0.800 | 98.00 | 40.0 (step 30) | never | n/a "
                        "| 1.00 | 1.50 | 0.50 |")
    assert lines[4] == ("| mean (min-max) | 57.0 (50.0-64.0) | 97.50 (96.00-99.00) | 44.0 (40.0-48.0) | 15 (10-20) "
                        "| 97.45 (97.00-97.90) | 0.775 (0.750-0.800) | 96.50 (95.00-98.00) | 35.0 (30.0-40.0) "
                        "| 24.0 (24.0-24.0), 1/2 | 0.800 (0.800-0.800), 1/2 | 1.25 (1.00-1.50) | 1.75 (1.50-2.00) "
                        "| 0.50 (0.50-0.50) |")
    assert lines[6] == ("relaxed: 0.775 x full's wall time (mean of 2 pairs); 0.800 x full's time to its final top-1 "
                        "- 1 (over 1 of 2 pairs).")
    stem = out / "time_to_accuracy"
    assert lines[-1] == f"wrote {stem}.md, {stem}.json, {stem}.png"
    assert (out / "time_to_accuracy.md").read_text() + lines[-1] + "\n" == printed
    report = json.loads((out / "time_to_accuracy.json").read_text())
    assert (report["margin"], report["baseline"], report["candidate"]) == (1.0, "full", "relaxed")
    assert [p["candidate"]["target_step"] for p in report["pairs"]] == [30, None]
    assert report["summary"]["target_ratio"]["n"] == 1
    assert (out / "time_to_accuracy.png").read_bytes().startswith(PNG_SIGNATURE)
    # no --out: beside the runs (the folder they share); --margin moves the targets
    assert main(["time-to-accuracy", *args, "--margin", "2"]) == 0
    beside = json.loads((tmp_path / "runs" / "time_to_accuracy.json").read_text())
    assert [p["target"] for p in beside["pairs"]] == [94.0, 97.0]


def test_the_command_fails_in_one_line_without_a_baseline_of_the_seed(study, tmp_path, capsys):
    assert main(["time-to-accuracy", str(study["relaxed_s1"]), "--baseline", str(study["full_s0"]),
                 "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (
        "prelora time-to-accuracy: error: no baseline run of the seed of relaxed_s1 (seed 1).\n")
    assert not (tmp_path / "out").exists()


def test_run_study_writes_each_arm_against_full(study, tmp_path, monkeypatch, capsys):
    """run_study's runs done already (summary.json there): it tabulates them, time to accuracy included."""
    out = tmp_path / "runs"
    study["full_s1"].rename(out / "full_s1")
    monkeypatch.setattr(sys, "argv", ["run_study.py", "--only", "full", "relaxed", "--seeds", "0", "1",
                                      "--out", str(out)])
    load_tool("run_study").main()
    printed = capsys.readouterr().out
    assert f"# {out / 'relaxed_s1'} done already" in printed
    report = json.loads((out / "time_to_accuracy_relaxed.json").read_text())
    assert [(p["seed"], p["candidate"]["target_step"]) for p in report["pairs"]] == [(0, 30), (1, None)]
    assert (out / "time_to_accuracy_relaxed.md").read_text() in printed
    assert (out / "time_to_accuracy_relaxed.png").read_bytes().startswith(PNG_SIGNATURE)
    assert not (out / "time_to_accuracy_full.json").exists()
