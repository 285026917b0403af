"""The engine switch under bf16 ZeRO-2 on 2 real ranks (docs/design.md §4): one launch, many facts."""

from __future__ import annotations

import json
import math

import pytest
from conftest import BIN, ROOT, run

pytestmark = pytest.mark.launch


@pytest.fixture(scope="module")
def facts(tmp_path_factory):
    out = tmp_path_factory.mktemp("switch")
    run([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", "29611",
         str(ROOT / "tests" / "scripts" / "switch_check.py"), str(out)])
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_fp32_masters_survive_both_switches_bit_for_bit(facts):
    for f in facts:
        assert f["warmup_compared"] == 56  # every base parameter was compared
        assert f["warmup_mismatch"] == []
        assert f["lora_mismatch"] == []


def test_without_writing_masters_back_the_bf16_rounding_is_real(facts):
    # the control: deepspeed.initialize alone rebuilds masters from bf16 copies, so every tensor differs
    assert all(f["control_mismatch"] > 40 for f in facts)


def test_loss_on_fixed_batch_unchanged_by_switch_to_warmup(facts):
    for f in facts:
        assert math.isclose(f["loss_before"], f["loss_after"], rel_tol=1e-2)  # bf16 tolerance
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
        assert f["live_engines"] == 1  # the destroyed engines are really gone


def test_norms_are_all_reduced_and_exact(facts):
    assert facts[0]["norms"] == facts[1]["norms"]  # the same numbers on every rank
    for m, vals in facts[0]["norms"].items():
        for a, b in zip(vals, facts[0]["norms_direct"][m], strict=True):
            assert math.isclose(a, b, rel_tol=1e-5)
    assert facts[0]["loss_sum"] == 3.0 and facts[0]["loss_count"] == 4.0  # 1 + 2 and 2 + 2


def test_fresh_timm_model_takes_the_gathered_state(facts):
    assert all(f["fresh_missing"] == [] for f in facts)
