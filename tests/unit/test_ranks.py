"""Algorithm 2 (rank assignment) and the PEFT rank/alpha patterns, on hand-computed cases."""

from __future__ import annotations

import json
import math
import re

import pytest

from prelora_ds.algorithm import ranks
from prelora_ds.algorithm.convergence import layer_changes
from prelora_ds.algorithm.ranks import assign_ranks, candidate_ranks, rank_pattern, ranks_by_module_name

# --------------------------------------------------------------------------- candidate_ranks


@pytest.mark.parametrize(
    ("r_min", "r_max", "expected"),
    [(8, 64, [8, 16, 32, 64]), (8, 8, [8]), (4, 256, [4, 8, 16, 32, 64, 128, 256]), (1, 2, [1, 2])],
)
def test_candidate_ranks(r_min, r_max, expected):
    assert candidate_ranks(r_min, r_max) == expected


def test_candidate_ranks_defaults():
    assert candidate_ranks() == [8, 16, 32, 64]


@pytest.mark.parametrize(("r_min", "r_max"), [(12, 64), (8, 48), (0, 8), (-8, 8), (8.0, 64), (True, 8)])
def test_candidate_ranks_rejects_non_powers_of_two(r_min, r_max):
    with pytest.raises(ValueError, match="power of two"):
        candidate_ranks(r_min, r_max)


def test_candidate_ranks_rejects_reversed_bounds():
    with pytest.raises(ValueError, match="larger than"):
        candidate_ranks(64, 8)


# --------------------------------------------------------------------------- assign_ranks


def test_assign_ranks_hand_computed():
    # x = [0, .25, .5, .75, 1] -> floor(4x) = [0, 1, 2, 3, 4] -> clamp last to 3.
    assert assign_ranks({"m": [0.0, 1.0, 2.0, 3.0, 4.0]}) == {"m": [8, 16, 32, 64, 64]}


def test_assign_ranks_bucket_boundaries():
    # x = [0, .249, .25, .999, 1] -> index [0, 0, 1, 3, 3].
    assert assign_ranks({"m": [0.0, 24.9, 25.0, 99.9, 100.0]}) == {"m": [8, 8, 16, 64, 64]}


def test_assign_ranks_scales_from_the_module_minimum():
    # min 10, max 30: x = [0, .5, 1] -> [8, 32, 64]; raw values would all be far above 1.
    assert assign_ranks({"m": [10.0, 20.0, 30.0]}) == {"m": [8, 32, 64]}


def test_assign_ranks_keeps_layer_order():
    assert assign_ranks({"m": [4.0, 0.0, 2.0]}) == {"m": [64, 8, 32]}


def test_assign_ranks_modules_are_scaled_independently():
    out = assign_ranks({"attn.qkv": [0.0, 1.0], "mlp.fc1": [100.0, 200.0], "mlp.fc2": [0.001, 0.002]})
    assert out == {"attn.qkv": [8, 64], "mlp.fc1": [8, 64], "mlp.fc2": [8, 64]}


@pytest.mark.parametrize(
    ("r_min", "r_max", "middle"),
    [(8, 64, 16), (8, 32, 16), (4, 64, 16), (8, 16, 8), (8, 8, 8)],  # R[(|R|-1)//2]
)
def test_assign_ranks_equal_changes_get_the_middle_rank(r_min, r_max, middle):
    assert assign_ranks({"m": [3.0, 3.0, 3.0]}, r_min, r_max) == {"m": [middle] * 3}


def test_assign_ranks_one_layer_gets_the_middle_rank():
    assert assign_ranks({"m": [7.5]}) == {"m": [16]}


def test_assign_ranks_single_candidate():
    assert assign_ranks({"m": [0.0, 5.0, 10.0]}, 32, 32) == {"m": [32, 32, 32]}


def test_assign_ranks_custom_range():
    # |R| = 3 (16, 32, 64): x = [0, .3, .34, 1] -> floor(3x) = [0, 0, 1, 3 -> 2].
    assert assign_ranks({"m": [0.0, 0.3, 0.34, 1.0]}, 16, 64) == {"m": [16, 16, 32, 64]}


def test_assign_ranks_zero_changes():
    assert assign_ranks({"m": [0.0, 0.0]}) == {"m": [16, 16]}


def test_assign_ranks_infinite_change_is_the_limit_of_the_formula():
    assert assign_ranks({"m": [1.0, math.inf, 3.0]}) == {"m": [8, 64, 8]}
    assert assign_ranks({"m": [math.inf, math.inf]}) == {"m": [16, 16]}


@pytest.mark.parametrize("bad", [math.nan, -1.0, -math.inf])
def test_assign_ranks_rejects_nan_and_negative(bad):
    with pytest.raises(ValueError, match="non-negative"):
        assign_ranks({"m": [1.0, bad]})


def test_assign_ranks_rejects_module_without_layers():
    with pytest.raises(ValueError, match="no layers"):
        assign_ranks({"m": []})


def test_assign_ranks_rejects_bad_range():
    with pytest.raises(ValueError):
        assign_ranks({"m": [1.0, 2.0]}, 8, 24)


def test_assign_ranks_empty_mapping():
    assert assign_ranks({}) == {}


def test_assign_ranks_more_movement_never_means_a_lower_rank():
    values = [0.3, 5.0, 0.0, 2.2, 9.9, 1.1, 7.4, 4.4, 0.05, 3.3, 6.0, 8.8]
    ranks = assign_ranks({"m": values})["m"]
    by_value = [r for _, r in sorted(zip(values, ranks, strict=True))]
    assert by_value == sorted(by_value)
    assert ranks[values.index(0.0)] == 8 and ranks[values.index(9.9)] == 64


def test_assign_ranks_from_layer_changes():
    norms = {"attn.qkv": [[100.0, 100.0, 100.0], [100.0, 101.0, 102.0]]}  # changes 0, 1, 2 %
    assert assign_ranks(layer_changes(norms)) == {"attn.qkv": [8, 32, 64]}


# --------------------------------------------------------------------------- PEFT patterns

NAMES = {
    "attn.qkv": [f"blocks.{i}.attn.qkv" for i in range(12)],
    "mlp.fc1": [f"blocks.{i}.mlp.fc1" for i in range(12)],
}
RANKS = {"attn.qkv": [8, 16, 32, 64] * 3, "mlp.fc1": [64] * 12}


def test_ranks_by_module_name():
    out = ranks_by_module_name(NAMES, RANKS)
    assert len(out) == 24
    assert out["blocks.1.attn.qkv"] == 16
    assert out["blocks.11.attn.qkv"] == 64
    assert out["blocks.3.mlp.fc1"] == 64
    assert json.loads(json.dumps(out)) == out


def test_rank_pattern_keys_are_anchored_and_escaped():
    r_pat, a_pat = rank_pattern(NAMES, RANKS, alpha_ratio=2.0)
    key = r"^blocks\.1\.attn\.qkv$"
    assert key in r_pat and r_pat[key] == 16
    assert re.fullmatch(key, "blocks.1.attn.qkv")
    assert not re.fullmatch(key, "blocks.11.attn.qkv")
    assert not re.search(key, "blocks.11.attn.qkv")
    assert not re.search(key, "blocksX1.attn.qkv")  # '.' is escaped
    assert set(a_pat) == set(r_pat)


def test_rank_pattern_matches_each_layer_once_under_peft_matching():
    # PEFT (peft.utils.other.get_pattern_key) matches a key as re.match(rf"(.*\.)?({key})$", module_name);
    # every module name must hit exactly its own key, or PEFT would silently give it the default rank.
    r_pat, _ = rank_pattern(NAMES, RANKS, alpha_ratio=2.0)
    for name, rank in ranks_by_module_name(NAMES, RANKS).items():
        hits = [k for k in r_pat if re.match(rf"(.*\.)?({k})$", name)]
        assert hits == ["^" + re.escape(name) + "$"]
        assert r_pat[hits[0]] == rank


def test_alpha_is_ratio_times_rank():
    r_pat, a_pat = rank_pattern(NAMES, RANKS, alpha_ratio=2.0)
    for key, r in r_pat.items():
        assert a_pat[key] == 2.0 * r
        assert isinstance(a_pat[key], float)
    _, a_half = rank_pattern(NAMES, RANKS, alpha_ratio=0.5)
    assert a_half[r"^blocks\.3\.attn\.qkv$"] == 32.0
    # constant LoRA scale alpha / r across layers
    assert {a_pat[k] / r_pat[k] for k in r_pat} == {2.0}


def test_rank_pattern_is_json_serialisable():
    r_pat, a_pat = rank_pattern(NAMES, RANKS, alpha_ratio=2.0)
    assert json.loads(json.dumps([r_pat, a_pat])) == [r_pat, a_pat]


@pytest.mark.parametrize("alpha_ratio", [0.0, -1.0, math.nan, math.inf])
def test_rank_pattern_rejects_bad_alpha_ratio(alpha_ratio):
    with pytest.raises(ValueError, match="alpha_ratio"):
        rank_pattern(NAMES, RANKS, alpha_ratio)


def test_names_and_ranks_must_line_up():
    with pytest.raises(ValueError, match="module keys differ"):
        ranks_by_module_name({"attn.qkv": NAMES["attn.qkv"]}, RANKS)
    with pytest.raises(ValueError, match="12 layer names but 11 ranks"):
        ranks_by_module_name(NAMES, {**RANKS, "mlp.fc1": [8] * 11})
    with pytest.raises(ValueError, match="twice"):
        ranks_by_module_name({"a": ["x", "x"]}, {"a": [8, 8]})
    with pytest.raises(ValueError, match="positive int"):
        ranks_by_module_name({"a": ["x"]}, {"a": [0]})


def test_end_to_end_names_with_regex_characters():
    names = {"w": ["model.layers[0].w", "model.layers[0]+w"]}
    r_pat, _ = rank_pattern(names, assign_ranks({"w": [0.0, 1.0]}), 2.0)
    assert r_pat == {r"^model\.layers\[0\]\.w$": 8, r"^model\.layers\[0\]\+w$": 64}
    for key in r_pat:
        assert sum(bool(re.fullmatch(key, n)) for n in names["w"]) == 1


# ------------------------------------------------------------------ ranks relative to the layer's width
@pytest.mark.parametrize(
    ("rank", "width", "expected"),
    [(8, 1024, 8), (64, 1024, 64), (8, 192, 2), (64, 192, 16), (8, 384, 4), (64, 384, 32), (8, 768, 8),
     (64, 768, 64), (8, 1280, 8), (64, 1280, 64), (8, 64, 1), (8, 2048, 16)],
)  # fmt: skip
def test_scaled_rank_is_the_nearest_power_of_two(rank, width, expected):
    # 6 and 48 at 768 lie nearer 8 and 64 than 4 and 32 in log2 (0.415 of an octave up)
    assert ranks.scaled_rank(rank, width, 1024) == expected


def test_module_bounds_keep_the_paper_at_vit_l_width_and_scale_narrow_models():
    widths = {"attn.qkv": 1024, "mlp.fc2": 1024}
    assert ranks.module_bounds(8, 64, widths, None) == {"attn.qkv": (8, 64), "mlp.fc2": (8, 64)}
    assert ranks.module_bounds(8, 64, widths, 1024) == {"attn.qkv": (8, 64), "mlp.fc2": (8, 64)}
    assert ranks.module_bounds(8, 64, {"attn.qkv": 192}, 1024) == {"attn.qkv": (2, 16)}
    assert ranks.module_bounds(8, 64, {"attn.qkv": 192}, None) == {"attn.qkv": (8, 64)}
    with pytest.raises(ValueError, match="widths must be positive"):
        ranks.scaled_rank(8, 0, 1024)


def test_assign_ranks_uses_each_modules_own_bounds():
    changes = {"attn.qkv": [0.0, 1.0, 2.0, 3.0], "mlp.fc1": [3.0, 2.0, 1.0, 0.0]}
    got = ranks.assign_ranks(changes, 8, 64, bounds={"attn.qkv": (2, 16), "mlp.fc1": (8, 64)})
    assert got == {"attn.qkv": [2, 4, 8, 16], "mlp.fc1": [64, 32, 16, 8]}
    assert ranks.assign_ranks(changes, 2, 16) == ranks.assign_ranks(changes, 8, 64, {m: (2, 16) for m in changes})
