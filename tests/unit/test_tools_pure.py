"""The `prelora` commands' pure parts: the replay decides with the trainer's policy; steps per epoch from a run's
history; where the replay reads the number of classes."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest

from prelora_ds.cli import CommandError, compare, replay
from prelora_ds.config.sections import DataConfig, PreLoRAConfig


def test_replay_decides_with_the_trainers_policy():
    windows = {
        "loss_windows": [2.0, 2.0, 2.0, 2.0],
        "norm_windows": {"attn.qkv": [[1.0, 1.0]] * 4},
        "checks": [{"window": k, "step": 4 * (k + 1), "epoch": k // 2} for k in range(4)],
        "thresholds": {"window_steps": 4},
    }
    p = PreLoRAConfig(window_steps=4, num_windows=3, delta_w=1.0, delta_l=1.0)
    assert replay.first_passing_window(windows, p)[0] == 2
    # window 2 closes mid-epoch 1: 1 epoch done, as the trainer counts
    assert replay.first_passing_window(windows, dataclasses.replace(p, min_epochs=1))[0] == 2
    assert replay.first_passing_window(windows, dataclasses.replace(p, min_epochs=2)) is None
    # a test that never passes (loss keeps changing) is forced by max_epochs at the first window with 1 epoch done
    moving = {**windows, "loss_windows": [4.0, 3.0, 2.0, 1.0]}
    k, decision = replay.first_passing_window(moving, dataclasses.replace(p, max_epochs=1))
    assert (k, decision.forced, decision.passed) == (2, True, False)


# ----------------------------------------------------------------------------- prelora compare
def test_steps_per_epoch_from_validation_history():
    assert compare.steps_per_epoch({"steps_per_epoch": 7}) == 7
    assert compare.steps_per_epoch({"epochs": 1, "val": [{"step": 22, "epoch": 0}, {"step": 40, "epoch": 1}]}) == 22
    assert compare.steps_per_epoch({"epochs": 0, "val": [{"step": 10, "epoch": 0}]}) is None


def test_switch_effects_measure_each_phase_and_the_tail():
    """Around a switch: the validation before and the first after, the steps of the phase it starts (its mean is
    compared with full training's over the same steps), and the mean of the last validations."""
    val = [{"step": 10 * i, "top1": float(t)} for i, t in enumerate([50, 60, 70, 64, 72, 80, 90, 92, 94, 96], 1)]
    summary = {"val": val, "final_val_top1": 96.0, "phases": [
        {"name": "full", "start_step": 0, "end_step": 30}, {"name": "warmup", "start_step": 30, "end_step": 60},
        {"name": "lora", "start_step": 60, "end_step": 100}]}  # fmt: skip
    eff = compare.switch_effects(summary, tail=3)
    warmup, lora = eff["changes"]
    assert (warmup["before"], warmup["after"], warmup["after_step"]) == (70.0, 64.0, 40)
    assert warmup["phase_steps"] == [40, 50, 60] and lora["phase_steps"] == [70, 80, 90, 100]
    assert compare.mean_top1(summary, warmup["phase_steps"]) == 72.0
    assert compare.mean_top1(summary, [40, 45]) is None  # a run without a validation there is not compared
    assert eff["tail_mean"] == 94.0 and eff["target_step"] == 100


def test_replay_gives_the_middle_rank_when_max_epochs_forced_a_switch_before_two_windows():
    """The trainer's choice with one closed window (no change to compare): the middle rank on every layer."""
    windows = {"norm_windows": {"attn.qkv": [[1.0, 2.0, 3.0]]},
               "layers": {"attn.qkv": [f"blocks.{i}.attn.qkv" for i in range(3)]}}
    assert replay.ranks_at(windows, 0, 8, 64) == {f"blocks.{i}.attn.qkv": 16 for i in range(3)}  # [8, 16, 32, 64]
    moved = {**windows, "norm_windows": {"attn.qkv": [[1.0, 2.0, 3.0], [1.0, 2.2, 3.0]]}}
    assert replay.ranks_at(moved, 1, 8, 64) == {"blocks.0.attn.qkv": 8, "blocks.1.attn.qkv": 64, "blocks.2.attn.qkv": 8}


def test_every_tool_builds_its_trainer_with_the_trainers_parameters():
    """The benchmarks build Trainers (directly or through the harness's synthetic_trainer); a keyword the Trainer
    does not take fails every run (TypeError)."""
    import ast
    import inspect

    from prelora_ds.testing.harness import REPO
    from prelora_ds.training.trainer import Trainer

    accepted = set(inspect.signature(Trainer.__init__).parameters)
    bad = []
    for path in sorted([*(REPO / "tools").glob("*.py"), *(REPO / "prelora_ds" / "testing").glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Trainer":
                bad += [f"{path.name}:{node.lineno} {k.arg}" for k in node.keywords if k.arg not in accepted]
    assert bad == []


# ----------------------------------------------------------------------------- prelora replay on a run directory
def forced_run(run_dir, dataset: dict | None = None, num_classes: int | None = 10):
    """A run directory as the trainer leaves it when max_epochs=1 forced the switch at the first closed window (one
    window: no change to compare): config.yaml (the demo recipe), windows.json, and summary.json unless
    `num_classes` is None (a run still running has none)."""
    import torch
    import yaml

    from prelora_ds.config.recipe import load_recipe
    from prelora_ds.engine.model import create_model
    from prelora_ds.lora.inject import module_key, target_layers
    from prelora_ds.testing.harness import REPO

    raw = yaml.safe_load((REPO / "recipes" / "demo.yaml").read_text())
    raw["prelora"]["max_epochs"] = 1
    raw["data"].update(dataset or {})
    run_dir.mkdir()
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_recipe(run_dir / "recipe.yaml")
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    with torch.device("meta"):
        names = target_layers(create_model(cfg.model, 10, init=False), cfg.prelora.target_modules)
    layers: dict[str, list[str]] = {}
    for name in names:
        layers.setdefault(module_key(name), []).append(name)
    p = cfg.prelora
    windows = {
        "loss_windows": [2.0],
        "norm_windows": {m: [[1.0 + i for i in range(len(group))]] for m, group in layers.items()},
        "checks": [{"window": 0, "step": 18, "epoch": 1}],
        "layers": layers,
        "thresholds": {"delta_w": p.delta_w, "delta_l": p.delta_l, "num_windows": p.num_windows,
                       "window_steps": None, "window_epochs": p.window_epochs, "r_min": p.r_min, "r_max": p.r_max,
                       "min_epochs": p.min_epochs, "max_epochs": p.max_epochs},
    }
    (run_dir / "windows.json").write_text(json.dumps(windows))
    if num_classes is not None:
        (run_dir / "summary.json").write_text(json.dumps({"switch_step": 18, "num_classes": num_classes}))
    return names


def test_replay_of_a_switch_forced_by_max_epochs_before_two_windows(tmp_path, capsys):
    """The whole command on a run forced at its first window: it switches there, every layer at the middle rank,
    the note says it was forced, and the class count is summary.json's."""
    from prelora_ds.cli import main

    names = forced_run(tmp_path / "run", num_classes=7)
    assert main(["replay", str(tmp_path / "run"), "--json", str(tmp_path / "out.json")]) == 0
    data = json.loads((tmp_path / "out.json").read_text())
    (row,) = data["rows"]
    assert (row["reached"], row["window"], row["switch_step"], row["switch_epoch"]) == (True, 0, 18, 1)
    assert "forced by max_epochs=1" in row["note"]
    assert row["ranks"] == dict.fromkeys(names, 16)  # r_min 8, r_max 64: candidates 8, 16, 32, 64
    assert row["trainable_lora"] > 0
    assert (data["num_classes"], data["num_classes_source"]) == (7, "summary.json")
    assert "| 5 | 25 | 3 | 18 | 1 | 0 |" in capsys.readouterr().out


def test_replay_without_summary_reads_the_classes_from_the_config(tmp_path):
    forced_run(tmp_path / "digits", num_classes=None)
    cfg = replay.read_config(tmp_path / "digits")
    assert replay.resolve_num_classes(tmp_path / "digits", cfg, None) == (10, "config.yaml data.dataset=digits: digits")
    assert replay.resolve_num_classes(tmp_path / "digits", cfg, 3) == (3, "--num_classes")
    assert replay.classes_from_data(DataConfig(dataset="synthetic", synthetic_num_classes=42))[0] == 42
    folder = tmp_path / "folder"
    for split in ("train", "val"):
        for c in ("a", "b", "c"):
            (folder / split / c).mkdir(parents=True)
    assert replay.classes_from_data(DataConfig(dataset="imagefolder", root=str(folder)))[0] == 3


def test_replay_without_summary_or_data_fails_with_one_line(tmp_path, capsys):
    from prelora_ds.cli import main

    missing = tmp_path / "gone"
    forced_run(tmp_path / "run", {"dataset": "imagefolder", "root": str(missing)}, num_classes=None)
    with pytest.raises(CommandError, match=r"it has no summary.json yet, and config.yaml's data section does not"):
        replay.resolve_num_classes(tmp_path / "run", replay.read_config(tmp_path / "run"), None)
    assert main(["replay", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"prelora replay: error: cannot tell the number of classes of {tmp_path / 'run'}")
    assert err.rstrip().endswith("pass --num_classes.") and err.count("\n") == 1


def test_plot_and_compare_without_matplotlib_name_the_extra(tmp_path, monkeypatch, capsys):
    """Without matplotlib (the `plot` extra): one line and exit 2 for the commands that draw; `prelora --help` and
    `prelora replay` never import it."""
    from prelora_ds.cli import main

    forced_run(tmp_path / "run")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ModuleNotFoundError
    monkeypatch.delitem(sys.modules, "prelora_ds.cli.plot", raising=False)
    run_dir = str(tmp_path / "run")
    for command in (["plot", run_dir], ["compare", run_dir, "--out", str(tmp_path / "x.png")]):
        assert main(command) == 2
        assert capsys.readouterr().err == (
            f"prelora {command[0]}: error: matplotlib is not installed; pip install 'prelora_ds[plot]'\n"
        )
    assert not (tmp_path / "run" / "plots").exists() and not (tmp_path / "x.png").exists()
    with pytest.raises(SystemExit) as help_exit:
        main(["--help"])
    assert help_exit.value.code == 0
    assert main(["replay", run_dir]) == 0


def test_sharpness_power_iteration_finds_the_top_eigenvalue_raw_and_adam_scaled():
    """A quadratic with a known Hessian (diagonal h on two tensors): the raw top eigenvalue is max h, the
    preconditioned one max h / P with Adam's P = sqrt(v / (1 - beta2^count)) + eps."""
    import torch

    from prelora_ds.cli import sharpness

    h = [torch.tensor([[1.0, 3.0], [0.5, 2.0]]), torch.tensor([7.0, 0.25, 4.0])]

    def hvp(u):
        return [hi * ui for hi, ui in zip(h, u, strict=True)]

    shapes = [t.shape for t in h]
    assert sharpness.top_eigenvalue(hvp, shapes, iters=500, tol=1e-9) == pytest.approx(7.0, rel=1e-6)
    v = [torch.tensor([[0.04, 0.0004], [1.0, 1.0]]), torch.tensor([4.0, 1.0, 1.0])]  # count 1: v_hat = v / 0.001
    scale = [sharpness.adam_scale(vi, 1, 0.999, 1e-8) for vi in v]
    p = [torch.sqrt(vi / 0.001) + 1e-8 for vi in v]
    expected = max(float((hi / pi).max()) for hi, pi in zip(h, p, strict=True))  # 3 / sqrt(0.4): the 2nd entry
    got = sharpness.top_eigenvalue(sharpness.preconditioned(hvp, scale), shapes, iters=500, tol=1e-9)
    assert expected == pytest.approx(3 / 0.4**0.5, rel=1e-6)
    assert got == pytest.approx(expected, rel=1e-5)


def test_sharpness_names_a_stage_0_checkpoint_it_cannot_read(tmp_path):
    """A checkpoint without ZeRO partitions (stage 0: the optimizer state in the model-states file) is refused
    with the reason, not a traceback from the universal conversion."""
    from prelora_ds.cli import sharpness

    tag = tmp_path / "checkpoints" / "step00000010"
    tag.mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"")
    with pytest.raises(CommandError, match=r"step00000010 was saved by a ZeRO stage-0 engine: .* measure a "
                       r"checkpoint of a run on ZeRO stage 1-3"):
        sharpness.load_state(tmp_path, "step00000010", 1.0)
