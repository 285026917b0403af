"""`prelora plot`, `prelora replay`, `prelora compare`, `prelora sharpness` on real run directories.

One PreLoRA run (2 CPU ranks started by mpirun, switch at the acceptance flags) and one
full-only run are made once for the module. The entry points run as subprocesses, as a user runs them (`python -m
prelora_ds.cli` and the installed `prelora` script: the help and the exit status of a refused command); the
commands' work runs in this process through `prelora_ds.cli.main`, what both entry points call, which saves a
subprocess's ~6 s of imports per call.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from prelora_ds.algorithm.convergence import layer_changes
from prelora_ds.algorithm.ranks import assign_ranks, ranks_by_module_name
from prelora_ds.testing.harness import mpirun_cmd, run, summary

PRELORA = [sys.executable, "-m", "prelora_ds.cli"]
COMMANDS = ["replay", "plot", "compare", "time-to-accuracy", "pack-shards", "check-hostfile", "sharpness"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FIGURES = ["weight_norms.png", "layer_changes.png", "ranks.png", "lora_norms.png", "throughput.png", "loss_top1.png"]

pytestmark = pytest.mark.launch


def run_prelora(command: str, *args: str) -> str:
    """`prelora COMMAND ARGS...` through `prelora_ds.cli.main` in this process: its stdout; it must exit 0."""
    from prelora_ds.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([command, *map(str, args)])
    assert code == 0, f"prelora {command} exited {code}: {out.getvalue()[-2000:]}"
    return out.getvalue()


def test_prelora_help_lists_every_command():
    """`prelora --help` lists the commands; `prelora COMMAND --help` shows the command's own options under its
    own name. No run needed."""
    out = run([*PRELORA, "--help"]).stdout
    assert out.startswith("usage: prelora [-h] COMMAND ...")
    assert re.findall(r"^ {4}(\S+)", out, flags=re.M) == COMMANDS, out  # help lines wrap deeper
    for name in COMMANDS:
        proc = run([*PRELORA, name, "--help"])
        assert proc.stdout.startswith(f"usage: prelora {name} ") and "--help" in proc.stdout, proc.stdout
    bad = run([*PRELORA, "no-such-command"], check=False)
    assert bad.returncode == 2 and "invalid choice: 'no-such-command'" in bad.stderr
    # the console script `pip install` put beside the interpreter is the same command
    installed = Path(sys.executable).parent / "prelora"
    assert installed.is_file(), f"{installed} missing: pyproject.toml's [project.scripts] must name prelora"
    assert run([str(installed), "--help"]).stdout == out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, split_reference) -> dict[str, Path]:
    """The PreLoRA run is the session's split q/k/v reference (the paper's six targets)."""
    full = tmp_path_factory.mktemp("tools") / "full"
    common = ["--recipe", "recipes/demo.yaml", "--train.log_every_steps", "1"]
    run(mpirun_cmd(*common, "--output_dir", full, "--prelora.enabled", "false", "--train.max_steps", "10"))
    return {"prelora": split_reference, "full": full}


def check_png(path: Path) -> None:
    from PIL import Image

    assert path.read_bytes()[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    with Image.open(path) as img:
        assert img.width >= 400 and img.height >= 400, f"{path} is {img.size}"
        colors = img.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 8, f"{path} looks blank ({len(colors or [])} colours)"


# ----------------------------------------------------------------------------- prelora plot
def test_plot_run_writes_every_figure(runs):
    out = run_prelora("plot", runs["prelora"])
    plots = runs["prelora"] / "plots"
    assert sorted(p.name for p in plots.glob("*.png")) == sorted(FIGURES)
    for name in FIGURES:
        assert str(plots / name) in out
        check_png(plots / name)
    assert "skipped" not in out


def test_plot_run_skips_figures_without_data(runs):
    out = run_prelora("plot", runs["full"])
    plots = runs["full"] / "plots"
    for name in ("ranks.png", "lora_norms.png", "layer_changes.png"):
        assert f"skipped {name}" in out
        assert not (plots / name).exists()
    for name in ("throughput.png", "loss_top1.png"):
        check_png(plots / name)


# ----------------------------------------------------------------------------- prelora replay
def replay(run_dir: Path, out: Path, *args: str) -> tuple[str, dict]:
    stdout = run_prelora("replay", run_dir, *args, "--json", out)
    return stdout, json.loads(out.read_text())


def table_rows(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("| ") and not line.startswith("| delta_w")]


def test_replay_at_own_thresholds_matches_the_run(runs, tmp_path):
    run_dir = runs["prelora"]
    s = summary(run_dir)
    stdout, data = replay(
        run_dir, tmp_path / "own.json", "--delta_w", "1000", "--delta_l", "1000", "--num_windows", "3"
    )
    (row,) = data["rows"]
    assert row["reached"] and row["switch_step"] == s["switch_step"] and row["switch_epoch"] == s["switch_epoch"]
    assert row["ranks"] == json.loads((run_dir / "ranks.json").read_text())
    lora = next(p for p in s["phases"] if p["name"] == "lora")
    assert row["trainable_lora"] == lora["trainable_params"]
    assert s["num_classes"] == 10  # the trainer writes it into summary.json
    assert (data["num_classes"], data["num_classes_source"]) == (10, "summary.json")
    assert f"| 1000 | 1000 | 3 | {s['switch_step']} |" in stdout


def test_replay_with_either_window_value(runs, tmp_path):
    """Both window values are recorded; `last` takes each window's last sample, so it gives other changes."""
    windows = json.loads((runs["prelora"] / "windows.json").read_text())
    assert windows["norm_windows"] == windows["norm_windows_mean"] != windows["norm_windows_last"]
    args = ["--delta_w", "1000", "--delta_l", "1000"]
    _, mean = replay(runs["prelora"], tmp_path / "mean.json", *args)
    _, last = replay(runs["prelora"], tmp_path / "last.json", *args, "--window_value", "last")
    assert (mean["window_value"], last["window_value"]) == ("mean", "last")
    assert mean["rows"][0]["switch_step"] == last["rows"][0]["switch_step"]  # thresholds of 1000 % always pass
    assert mean["rows"][0]["ranks"] == json.loads((runs["prelora"] / "ranks.json").read_text())
    k = last["rows"][0]["window"]  # the last samples' changes decide the ranks of the `last` replay
    changes = layer_changes({m: w[: k + 1] for m, w in windows["norm_windows_last"].items()})
    bounds = {m: tuple(b) for m, b in windows["thresholds"]["rank_bounds"].items()}
    assert set(bounds.values()) == {(4, 32)}  # SPLIT_RUN's 8..64 at width 384, on the demo's 192-wide layers
    assert set(json.loads((runs["prelora"] / "ranks.json").read_text()).values()) <= {4, 8, 16, 32}
    assert last["rows"][0]["ranks"] == ranks_by_module_name(windows["layers"], assign_ranks(changes, bounds=bounds))


def test_replay_at_a_threshold_between_the_recorded_window_changes(runs, tmp_path):
    """delta_w between the two recorded per-module changes (the trainer's own records in windows.json): with
    N=2 the replay must switch at the window whose change is the smaller one, and not at the other."""
    checks = [c for c in json.loads((runs["prelora"] / "windows.json").read_text())["checks"] if "D" in c]
    worst = {c["window"]: max(abs(v) for v in c["D"].values()) for c in checks}
    assert len(worst) == 2 and len(set(worst.values())) == 2, worst
    (k_small, small), (_, large) = sorted(worst.items(), key=lambda kv: kv[1])
    between = (small + large) / 2
    _, data = replay(runs["prelora"], tmp_path / "between.json", "--delta_w", str(between), "--delta_l", "1000",
                     "--num_windows", "2")  # fmt: skip
    assert data["rows"][0]["window"] == k_small
    _, data = replay(runs["prelora"], tmp_path / "below.json", "--delta_w", str(small * 0.99), "--delta_l", "1000",
                     "--num_windows", "2")  # fmt: skip
    assert not data["rows"][0]["reached"]


def test_replay_tiny_threshold_is_not_reached(runs, tmp_path):
    stdout, data = replay(runs["prelora"], tmp_path / "tiny.json", "--delta_w", "1e-9")
    last = json.loads((runs["prelora"] / "windows.json").read_text())["checks"][-1]["step"]
    assert f"not reached (windows end at step {last})" in stdout
    assert [r["reached"] for r in data["rows"]] == [False]


def test_replay_grid_prints_one_row_per_combination(runs, tmp_path):
    args = ["--delta_w", "1", "5", "--delta_l", "1", "5", "--num_windows", "2", "3"]
    stdout, data = replay(runs["prelora"], tmp_path / "grid.json", *args)
    assert len(table_rows(stdout)) == 8
    combos = {(r["delta_w"], r["delta_l"], r["num_windows"]) for r in data["rows"]}
    assert combos == {(w, lo, n) for w in (1.0, 5.0) for lo in (1.0, 5.0) for n in (2, 3)}


def test_replay_without_merged_model_reads_classes_from_summary(runs, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("windows.json", "summary.json", "config.yaml"):
        shutil.copy(runs["prelora"] / name, copy / name)
    stdout, data = replay(copy, tmp_path / "copy.json")
    assert summary(copy)["num_classes"] == 10
    assert data["num_classes"] == 10 and data["num_classes_source"] == "summary.json"
    assert data["rows"][0]["switch_step"] == summary(runs["prelora"])["switch_step"]


def test_replay_of_a_running_run_reads_classes_from_its_config(runs, tmp_path):
    """No summary.json yet (the run is still going): config.yaml's data section (the digits: 10 classes)."""
    copy = tmp_path / "running"
    copy.mkdir()
    for name in ("windows.json", "config.yaml"):
        shutil.copy(runs["prelora"] / name, copy / name)
    stdout, data = replay(copy, tmp_path / "running.json")
    assert data["num_classes"] == 10 and data["num_classes_source"] == "config.yaml data.dataset=digits: digits"
    assert "the run has no summary.json yet" in stdout
    assert data["rows"][0]["switch_step"] == summary(runs["prelora"])["switch_step"]


def test_compare_runs_table_and_png(runs, tmp_path):
    out = tmp_path / "cmp.png"
    stdout = run_prelora("compare", runs["prelora"], runs["full"], "--out", out)
    header, _, prelora, full = stdout.splitlines()[:4]
    assert "lora: trainable params" in header and "wall time (s)" in header
    s = summary(runs["prelora"])
    assert prelora.startswith("| run |") and f"| {s['switch_step']} |" in prelora
    assert f"{s['final_val_top1']:.2f}" in prelora and f"{s['wall_time_s']:.1f}" in prelora
    assert full.startswith("| full |") and "no switch" in full
    check_png(out)


def test_compare_runs_time_to_accuracy_curve(runs, tmp_path):
    curve = tmp_path / "tta.png"
    stdout = run_prelora("compare", runs["prelora"], runs["full"], "--out", tmp_path / "cmp.png", "--curve", curve)
    assert f"wrote {curve}" in stdout
    check_png(curve)
    val = summary(runs["prelora"])["val"]
    assert all(0 < a["wall_s"] < b["wall_s"] for a, b in zip(val, val[1:], strict=False))  # the clock of the run


# ----------------------------------------------------------------------------- prelora sharpness
def test_sharpness_loads_the_model_the_run_exported(runs):
    """The values `prelora sharpness` measures (universal conversion, the kept frozen base, LoRA factors merged) are
    bit for bit the merged model the PreLoRA run exported at its last step (a `lora` checkpoint: split q/k/v, rank
    8..64 factors)."""
    from safetensors.torch import load_file

    from prelora_ds.checkpoint import storage
    from prelora_ds.cli import sharpness
    from prelora_ds.config.recipe import load_recipe
    from prelora_ds.engine.model import fuse_qkv

    run_dir = runs["prelora"]
    tag = storage.complete_tags(run_dir / "checkpoints")[-1]
    assert tag == storage.tag_for(summary(run_dir)["steps"])  # the checkpoint of the step the export was taken at
    state, _ = sharpness.load_state(run_dir, tag, load_recipe(run_dir / "config.yaml").prelora.alpha_ratio)
    exported = load_file(str(run_dir / "model_merged.safetensors"))
    ours = fuse_qkv(state)
    assert sorted(ours) == sorted(exported)
    assert [k for k in exported if not torch.equal(ours[k], exported[k])] == []


def test_sharpness_of_a_full_checkpoint(runs, tmp_path):
    """On the full run's last checkpoint: every target layer measured with its own Adam state (the step count of
    the checkpoint), a positive top eigenvalue, and Adam's preconditioner (1 / sqrt(v), v ~ g^2 << 1) scaling it
    up; the JSON file is what it printed."""
    out = run_prelora("sharpness", runs["full"], "--images", "32", "--iters", "15", "--json", tmp_path / "s.json")
    result = json.loads(out)
    assert result == json.loads((tmp_path / "s.json").read_text())
    assert result["layers"] == 4 * 6 and result["images"] == 32  # qkv, proj, fc1, fc2 of each of the 6 blocks
    assert result["adam_counts"] == [summary(runs["full"])["steps"]] and result["moments"] == "the checkpoint's own"
    assert 0 < result["lambda_max"] < result["lambda_max_adam"]
    bad = run([*PRELORA, "sharpness", str(runs["full"]), "--step", "3"], check=False)
    assert bad.returncode == 2 and "no complete checkpoint step00000003" in bad.stderr, bad.stderr
