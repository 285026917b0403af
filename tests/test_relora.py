"""ReLoRA under ZeRO-2: the jagged schedule (pure), one merge on 2 real ranks, and full runs."""

from __future__ import annotations

import json

import pytest
from conftest import BIN, ROOT, run, scalars, summary

from prelora_ds.relora import merge_due, restart_factor


def test_restart_factor_around_a_merge():
    start, every, warm = 10, 5, 3
    # before the first merge (steps 10..14 run at the plain cosine), and outside relora
    assert [restart_factor(s, start, every, warm) for s in range(0, 15)] == [1.0] * 15
    # merge after step 15 is done: steps 15, 16, 17 ramp 1/3, 2/3, 1; then 1 until the next merge
    assert [restart_factor(s, start, every, warm) for s in range(15, 21)] == [1 / 3, 2 / 3, 1.0, 1.0, 1.0, 1 / 3]
    assert restart_factor(25, start, every, warm, end=25) == 1.0  # relora over: plain cosine again
    assert restart_factor(16, start, every, 0) == 1.0  # no re-warmup configured


def test_merge_due_every_n_steps_after_start():
    assert [s for s in range(0, 31) if merge_due(s, 10, 5)] == [15, 20, 25, 30]


@pytest.mark.launch
class TestMergeOnTwoRanks:
    @pytest.fixture(scope="class")
    def facts(self, tmp_path_factory):
        out = tmp_path_factory.mktemp("relora")
        run([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", "29671",
             str(ROOT / "tests" / "scripts" / "relora_check.py"), str(out)])
        return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]

    def test_output_unchanged_b_zero_a_redrawn(self, facts):
        for f in facts:
            assert f["merges"] == 1
            assert f["b_norm_before"] > 0 and f["b_after_max"] == 0.0
            assert f["a_changed"] and f["a_master_equals_module"]
            assert f["base_moved"] > 0  # the delta went into the fp32 base
            # bf16 forward: within 1 ulp of the largest logit
            assert f["out_max_abs_diff"] <= 2 ** -7 * max(1.0, f["out_max_abs"])
            assert f["b_after_step"] > 0  # training goes on from the merged state
        assert facts[0]["a_rank0"] == facts[1]["a_rank0"]  # every rank drew the same A

    def test_pruned_adam_state_is_zero_in_the_partitions(self, facts):
        for f in facts:
            assert f["read_from_partitions"] and f["partition_entries"] > 1000
            assert 0.89 <= f["partition_zero_share"] <= 0.95


@pytest.mark.launch
def test_hybrid_run_phases_full_relora_warmup_lora(relora_reference):
    """The acceptance run (kills, resumes and world-size changes of it are in test_reliability)."""
    s = summary(relora_reference)
    assert [p["name"] for p in s["phases"]] == ["full", "relora", "warmup", "lora"]
    assert s["phases"][1]["start_step"] == 4
    assert s["relora_merges"] >= 2
    ranks = json.loads((relora_reference / "ranks.json").read_text())
    assert set(ranks.values()) <= {8, 16, 32, 64}  # the PreLoRA assignment replaces the uniform 16
    tb = scalars(relora_reference, "relora/")
    assert [v for _, v in tb["relora/merges"]] == list(range(1, s["relora_merges"] + 1))
    assert all(0.85 <= v <= 1.0 for _, v in tb["relora/pruned_share"])
