"""The tools' pure parts: the replay decides with the trainer's policy; steps per epoch from a run's history."""

from __future__ import annotations

import dataclasses

from conftest import load_tool

from prelora_ds.config.sections import PreLoRAConfig


def test_replay_decides_with_the_trainers_policy():
    rc = load_tool("replay_convergence")
    windows = {
        "loss_windows": [2.0, 2.0, 2.0, 2.0],
        "norm_windows": {"attn.qkv": [[1.0, 1.0]] * 4},
        "checks": [{"window": k, "step": 4 * (k + 1), "epoch": k // 2} for k in range(4)],
        "thresholds": {"window_steps": 4},
    }
    p = PreLoRAConfig(window_steps=4, num_windows=3, delta_w=1.0, delta_l=1.0)
    assert rc.first_passing_window(windows, p)[0] == 2
    # window 2 closes mid-epoch 1: 1 epoch done, as the trainer counts
    assert rc.first_passing_window(windows, dataclasses.replace(p, min_epochs=1))[0] == 2
    assert rc.first_passing_window(windows, dataclasses.replace(p, min_epochs=2)) is None
    # a test that never passes (loss keeps changing) is forced by max_epochs at the first window with 1 epoch done
    moving = {**windows, "loss_windows": [4.0, 3.0, 2.0, 1.0]}
    k, decision = rc.first_passing_window(moving, dataclasses.replace(p, max_epochs=1))
    assert (k, decision.forced, decision.passed) == (2, True, False)


# ----------------------------------------------------------------------------- compare_runs
def test_steps_per_epoch_from_validation_history():
    cr = load_tool("compare_runs")
    assert cr.steps_per_epoch({"steps_per_epoch": 7}) == 7
    assert cr.steps_per_epoch({"epochs": 1, "val": [{"step": 22, "epoch": 0}, {"step": 40, "epoch": 1}]}) == 22
    assert cr.steps_per_epoch({"epochs": 0, "val": [{"step": 10, "epoch": 0}]}) is None


def test_replay_gives_the_middle_rank_when_max_epochs_forced_a_switch_before_two_windows():
    """The trainer's choice with one closed window (no change to compare): the middle rank on every layer."""
    rc = load_tool("replay_convergence")
    windows = {"norm_windows": {"attn.qkv": [[1.0, 2.0, 3.0]]},
               "layers": {"attn.qkv": [f"blocks.{i}.attn.qkv" for i in range(3)]}}
    assert rc.ranks_at(windows, 0, 8, 64) == {f"blocks.{i}.attn.qkv": 16 for i in range(3)}  # [8, 16, 32, 64]
    moved = {**windows, "norm_windows": {"attn.qkv": [[1.0, 2.0, 3.0], [1.0, 2.2, 3.0]]}}
    assert rc.ranks_at(moved, 1, 8, 64) == {"blocks.0.attn.qkv": 8, "blocks.1.attn.qkv": 64, "blocks.2.attn.qkv": 8}


def test_every_tool_builds_its_trainer_with_the_trainers_parameters():
    """The benchmarks build Trainers directly; a keyword the Trainer does not take fails every run (TypeError)."""
    import ast
    import inspect

    from conftest import ROOT

    from prelora_ds.training.trainer import Trainer

    accepted = set(inspect.signature(Trainer.__init__).parameters)
    bad = []
    for path in sorted((ROOT / "tools").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Trainer":
                bad += [f"{path.name}:{node.lineno} {k.arg}" for k in node.keywords if k.arg not in accepted]
    assert bad == []
