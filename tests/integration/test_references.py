"""What the session's reference runs achieve, in absolute terms rather than against each other (issue 38): the
training loss falls, validation top-1 ends well above chance, the LoRA factors grow through `lora` while the frozen
base stays put; and the ReLoRA reference switches where the convergence test passes at thresholds between its
windows' recorded changes, at the step `prelora replay` computes from the same windows. No launch of its own: the
session's references (tests/conftest.py). Every margin below was measured on the AVX-512 recording of
tests/golden/demo_runs.json and again on AVX2 and SSE4.2 kernels with 1 and 2 threads a rank: those CPUs moved the
losses by at most 6e-6, the LoRA norms by 1.2e-6 relative, top-1 not at all, the window changes as RELORA_RUN says."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from statistics import mean

import pytest

from prelora_ds.metrics.readers import scalars
from prelora_ds.testing.harness import RELORA_DELTA_L, RELORA_DELTA_W, run, summary

pytestmark = pytest.mark.launch

CHANCE = 10.0  # top-1 % of a guess among the digits' 10 classes; 360 validation images: 1.6 points of noise
# The mean loss of the last 4 steps against the first 4 (the initial model's: the LR ramps from 0 over 2 epochs).
# Measured drops: 0.128 (switch), 0.125 (split), 0.147 (relora).
LOSS_DROP = 0.06
# ||s B A|| of each layer at the end of `lora` against its start. Measured: at least 1.83x (switch 1.83, split 1.88,
# relora 2.50 at their weakest layer); frozen factors give exactly 1.
LORA_GROWTH = 1.5


@pytest.fixture(params=["switch_reference", "split_reference", "relora_reference"])
def reference(request) -> Path:
    return request.getfixturevalue(request.param)


def phase(run_dir: Path, name: str) -> dict:
    return next(p for p in summary(run_dir)["phases"] if p["name"] == name)


def test_training_loss_falls(reference):
    loss = dict(scalars(reference, "1_train/loss")["1_train/loss"])
    steps = sorted(loss)
    assert steps == list(range(1, summary(reference)["steps"] + 1))
    first, last = mean(loss[s] for s in steps[:4]), mean(loss[s] for s in steps[-4:])
    assert first - last >= LOSS_DROP, (first, last)


def test_validation_top1_ends_well_above_chance(reference):
    """Final top-1 at least twice chance (measured 26.7, 25.6, 26.4 %), and at least 5 points over the first
    validation, at the end of epoch 0 (measured +8.6, +7.8, +12.2): learning goes on after the switch."""
    top1 = [v["top1"] for v in summary(reference)["val"]]
    assert top1[-1] == summary(reference)["final_val_top1"]
    assert top1[-1] >= 2 * CHANCE, top1
    assert top1[-1] >= top1[0] + 5, top1


def test_lora_factors_grow_through_lora_while_the_base_stays(reference):
    """From lora's first step to its last, the mean ||s B A|| rises at every sample and every layer's grows by
    LORA_GROWTH or more; ||W|| of the frozen base does not move by one bit (its kept fp32 copy)."""
    lora = phase(reference, "lora")
    tb = scalars(reference, "lora_norm/")

    def through_lora(tag: str) -> list[float]:
        return [v for step, v in tb[tag] if lora["start_step"] <= step <= lora["end_step"]]

    delta = through_lora("lora_norm/lora/mean")
    assert len(delta) >= 5 and all(b > a for a, b in zip(delta, delta[1:], strict=False)), delta
    layers = json.loads((reference / "ranks.json").read_text())
    growth = {n: v[-1] / v[0] for n in layers for v in [through_lora(f"lora_norm/lora/{n}")]}
    assert min(growth.values()) >= LORA_GROWTH, sorted(growth.items(), key=lambda kv: kv[1])[:3]
    base = through_lora("lora_norm/base/mean")
    assert len(set(base)) == 1, base


def test_relora_reference_switches_where_the_convergence_test_passes(relora_reference, tmp_path):
    """RELORA_RUN's thresholds lie between its windows' recorded changes: the test runs at step 12 and fails, runs at
    16 and passes; `prelora replay` on the same windows.json switches at 16 at those thresholds, and at 12 (the first
    window it can) once neither threshold holds it back: each one alone decides."""
    checks = json.loads((relora_reference / "windows.json").read_text())["checks"]
    assert [(c["step"], c["phase"], c["passed"], c["reason"]) for c in checks] == [
        (4, "full", False, "ReLoRA runs first (relora.enabled, before relora.start_*)"),
        (8, "relora", False, "1 of num_windows=2 windows closed"),
        (12, "relora", False, "the test did not pass"),
        (16, "relora", True, "the partial-convergence test passed"),
    ]
    failed, passed = checks[2], checks[3]
    # margins (see RELORA_RUN): dL 1.626 -> 0.808 around 1.15; D 2.39e-3 -> 4.8e-5 around 1e-3
    assert passed["dL"] * 1.3 < RELORA_DELTA_L < failed["dL"] / 1.3, (passed["dL"], failed["dL"])
    assert max(passed["D"].values()) * 5 < RELORA_DELTA_W < max(failed["D"].values()) / 2, (passed["D"], failed["D"])
    s = summary(relora_reference)
    assert s["switch_step"] == passed["step"] == 16
    out = tmp_path / "replay.json"
    run([sys.executable, "-m", "prelora_ds.cli", "replay", str(relora_reference), "--delta_w", str(RELORA_DELTA_W),
         "1000", "--delta_l", str(RELORA_DELTA_L), "1000", "--json", str(out)], timeout=300)  # fmt: skip
    rows = {(r["delta_w"], r["delta_l"]): r for r in json.loads(out.read_text())["rows"]}
    assert rows[RELORA_DELTA_W, RELORA_DELTA_L]["switch_step"] == s["switch_step"]
    assert rows[RELORA_DELTA_W, RELORA_DELTA_L]["ranks"] == json.loads((relora_reference / "ranks.json").read_text())
    assert rows[1000.0, 1000.0]["switch_step"] == 12
    assert rows[RELORA_DELTA_W, 1000.0]["switch_step"] == rows[1000.0, RELORA_DELTA_L]["switch_step"] == 16
