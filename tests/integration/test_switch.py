"""The engine switch on 2 real ranks (docs/design.md §4): bf16 ZeRO-2, then Adam's moments across the switch under
ZeRO-2 (fp32), ZeRO-3 (bf16) and stage 0 (fp32); one launch, many facts."""

from __future__ import annotations

import json
import math

import pytest

from prelora_ds.testing.harness import BIN, REPO, mpirun_cmd, run

pytestmark = pytest.mark.launch


@pytest.fixture(scope="module")
def switch_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("switch")
    run(mpirun_cmd(out, script="tests/scripts/switch_check.py"))
    run([str(BIN / "python"), str(REPO / "tests" / "scripts" / "moments_check.py"), str(out), "--universal"])
    return out


@pytest.fixture(scope="module")
def facts(switch_out):
    return [json.loads((switch_out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_fp32_masters_survive_both_switches_bit_for_bit(facts):
    for f in facts:
        assert f["warmup_compared"] == 56  # every base parameter was compared
        assert f["warmup_mismatch"] == []
        assert f["lora_mismatch"] == []


def test_without_writing_masters_back_the_bf16_rounding_is_real(facts):
    # the control: deepspeed.initialize alone rebuilds masters from bf16 copies, so every tensor differs
    assert all(f["control_mismatch"] > 40 for f in facts)


def test_loss_on_fixed_batch_unchanged_by_switch_to_warmup(facts):
    """B = 0 adds exact zeros to each target layer's output, and the masters (so their bf16 copies) come back bit for
    bit: the function, bf16 forward included, is exactly the one before the switch."""
    for f in facts:
        assert f["loss_after"] == f["loss_before"]
    assert facts[0]["loss_after"] == facts[1]["loss_after"]


def test_trainable_sets_per_phase(facts):
    for f in facts:
        assert f["warmup_frozen"] == []  # warmup: base + LoRA
        assert f["warmup_lora_ranks"] and all(
            f["warmup_lora_ranks"][n] == 8 * 2 ** (i % 4) for i, n in enumerate(f["warmup_lora_ranks"])
        )
        extras = f["lora_trainable_non_lora"]  # lora: only the head and the LayerNorms besides LoRA
        assert extras and all(
            n.endswith(("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias"))
            or ".head." in n or n.startswith("base_model.model.norm.")
            for n in extras
        ), extras
        assert any(".head." in n for n in extras)
        assert f["lora_trainable_count"] == f["lora_params"] < f["warmup_params"] / 4
        assert f["lora_frozen_fp32_keys"] > 0
        assert f["frozen_changed"] == []  # a frozen base does not move


def test_memory_flat_over_five_rebuilds(facts):
    for f in facts:
        rss = f["rss"]
        assert len(rss) == 5
        assert max(rss) - rss[0] < 48 * 2**20, [r / 2**20 for r in rss]
        assert f["engines_after_rebuild"] == [1] * 5  # the old engine was freed by the rebuild, not later
        assert f["live_engines"] == 1  # the destroyed engines are really gone


def test_norms_are_all_reduced_and_exact(facts):
    assert facts[0]["norms"] == facts[1]["norms"]  # the same numbers on every rank
    for m, vals in facts[0]["norms"].items():
        for a, b in zip(vals, facts[0]["norms_direct"][m], strict=True):
            assert math.isclose(a, b, rel_tol=1e-5)
    assert facts[0]["loss_sum"] == 3.0 and facts[0]["loss_count"] == 4.0  # 1 + 2 and 2 + 2


def test_fresh_timm_model_takes_the_gathered_state(facts):
    """Every parameter of a fresh timm model gets its value from the gathered fp32 state, bit for bit, and no value of
    the state is left over (the export path)."""
    for f in facts:
        assert f["fresh_missing"] == [] and f["fresh_unused"] == []
        assert f["fresh_compared"] == f["warmup_compared"] and f["fresh_mismatch"] == []


# ---------------------------------------------------------------- Adam's moments across the switch
MOMENT_CONFIGS = ("zero0_fp32", "zero2_fp32", "zero3_bf16")


def moment_facts(out, name):
    return [json.loads((out / f"{name}.rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.parametrize("name", MOMENT_CONFIGS)
def test_moments_of_every_continuing_parameter_cross_the_switch_bit_for_bit(switch_out, name):
    for f in moment_facts(switch_out, name):
        assert f["full_counts"] == [12]  # 12 steps of full: one history for every parameter
        assert f["warmup_carried"] == f["full_params"] and len(f["full_params"]) == 32  # every base parameter
        assert f["warmup_mismatch"] == []  # exp_avg, exp_avg_sq and the step count, bit for bit
        assert f["lora_mismatch"] == [] and f["lora_carried"]  # warmup -> lora: LoRA factors, head, norms
        assert set(f["lora_carried"]) == {n.replace("base_model.model.", "") for n in f["lora_trainable"]}


@pytest.mark.parametrize("name", MOMENT_CONFIGS)
def test_lora_factors_start_fresh_and_each_history_keeps_its_bias_correction(switch_out, name):
    for f in moment_facts(switch_out, name):
        assert not any(".lora_" in n for n in f["warmup_carried"])  # no state: zero moments at their first step
        counts = f["counts_after_step"]
        assert {c for n, c in counts.items() if ".lora_" in n} == {1}  # their own step count, not 13
        assert {c for n, c in counts.items() if ".lora_" not in n} == {13}  # the base's, not 1
        assert 0 < f["lora_exp_avg_sq_max"] < 1e-3  # (1 - beta2) g^2 of one step, not a carried value


@pytest.mark.parametrize("name", MOMENT_CONFIGS)
def test_a_resume_right_after_the_switch_restores_the_same_moments(switch_out, name):
    for f in moment_facts(switch_out, name):
        assert f["resume_phase"] == "warmup"
        assert f["resume_mismatch"] == []  # the split parameter groups rebuilt, each group's own state loaded
        assert f["resume_loss"] == f["loss_after_switch_step"]
        # each read is a collective: another key order on rank 1 (as after a universal load) reads the same values
        assert f["key_order_mismatch"] == []


@pytest.mark.parametrize("name", MOMENT_CONFIGS)
def test_a_resume_on_another_world_size_restores_the_same_moments_and_step_counts(switch_out, name):
    """2 ranks -> 1 rank through DeepSpeed's universal checkpoint. Its ZeRO-3 load gives every sub group the first
    one's step count; the saved per-group counts put each history's own back (without them the LoRA factors got 13,
    not 1). Stage 0 (fp32) has no partitions to convert: its checkpoint loads as saved (the conversion failed on it)."""
    f = json.loads((switch_out / f"{name}.universal.json").read_text())
    assert f["world"] == 1 and f["phase"] == "warmup"
    assert f["compared"] == 48 and f["mismatch"] == []


@pytest.mark.parametrize("name", ["zero2_fp32", "zero3_bf16"])
def test_the_base_frozen_through_relora_takes_up_its_moments_at_warmup(switch_out, name):
    """relora freezes the base: its moments from full are kept aside (through a checkpoint and a resume), and the
    switch to warmup gives them back (measured best of kept / fresh / fresh with a ramp, docs/study.md)."""
    for f in moment_facts(switch_out, f"{name}_relora"):
        frozen = {n.replace("base_model.model.", "").replace(".base_layer", "") for n in f["frozen_in_relora"]}
        assert f["kept"] == sorted(frozen) and len(frozen) > 10  # every weight relora froze
        assert f["kept_keys"] == ["exp_avg", "exp_avg_sq"]
        assert f["kept_vs_full"] == []  # full's state, bit for bit, with its step count
        assert f["resume_mismatch"] == []  # dormant_moments.pt
        assert f["warmup_base_vs_kept"] == []  # taken up at relora -> warmup
        assert f["warmup_extras_vs_relora"] == []  # head and norms trained on through relora
        assert f["warmup_fresh"] and all(".lora_" in n for n in f["warmup_fresh"])  # only the new factors


@pytest.mark.parametrize("name", ["zero2_fp32", "zero3_bf16"])
def test_the_base_revived_after_relora_trains_at_its_lr_scale(switch_out, name):
    """In the warmup after relora the base (frozen through relora) steps at `relora.warmup_base_lr_scale` (0.1 here)
    of the schedule: the same first step at 1.0 (the paper's; the control, from the same checkpoint) moves the base
    1/scale as far and every other parameter (LoRA factors, head, norms) bit for bit the same; a resume keeps the
    groups. With `warmup_base_lr_ramp` the factor then rises by (1 - scale) / (warmup's steps) a step, across a
    resume too."""
    for f in moment_facts(switch_out, f"{name}_relora"):
        frozen = {n.replace("base_model.model.", "").replace(".base_layer", "") for n in f["frozen_in_relora"]}
        assert f["revived"] == sorted(frozen)
        scale = f["scale"]
        assert scale == 0.1
        revived_groups = [g for g in f["groups"] if g[1]]
        assert revived_groups and all(g[2] == scale and g[4] == f["lr"] * scale for g in revived_groups)
        assert all(g[2] is None and g[4] == f["lr"] for g in f["groups"] if not g[1])
        assert abs(f["base_update_ratio"] - scale) < 1e-3 * scale, f["base_update_ratio"]
        assert f["other_update_mismatch"] == [] and f["other_updated"] > 10
        assert f["resume_phase"] == "warmup"
        assert [[*g[:2], g[3]] for g in f["resume_groups"]] == [[*g[:2], g[3]] for g in f["groups"]]
        ramp = [scale + (1 - scale) * k / f["warmup_steps"] for k in range(3)]  # the first three steps of warmup
        assert f["warmup_steps"] > 10
        second = [g for g in f["second_groups"] if g[1]]
        assert second and all(g[2] == pytest.approx(ramp[1], rel=1e-12) for g in second)
        assert all(g[4] == pytest.approx(f["second_lr"] * ramp[1], rel=1e-12) for g in second)
        assert f["resume_step_groups"] == pytest.approx([ramp[2]] * len(second), rel=1e-12)


@pytest.mark.parametrize("name", MOMENT_CONFIGS)
def test_the_first_step_after_the_switch_moves_the_model_like_a_step_of_full(switch_out, name):
    """The base weights' update in the step after the switch against the last steps of `full` in the same run:
    with the moments carried it is one more step; with a fresh optimizer (the control) every entry moves by about
    the LR, as in the run's first step."""
    for f in moment_facts(switch_out, name):
        last_full = f["update_norms"][-4:]
        assert f["switch_update_norm"] <= 1.25 * max(last_full), (f["switch_update_norm"], last_full)
        losses = f["losses"]
        bound = max(abs(losses[i] - losses[i - 1]) for i in range(len(losses) - 4, len(losses)))
        assert abs(f["loss_after_switch_step"] - f["loss_at_switch"]) <= bound
    for f in moment_facts(switch_out, "zero2_fp32_reset"):
        assert f["warmup_carried"] == []  # switch_optimizer: reset
        assert f["switch_update_norm"] > 2 * max(f["update_norms"][-4:])  # the shock the carry removes
        assert f["switch_update_norm"] > 0.8 * f["update_norms"][0]  # as large as a first step from zero moments
