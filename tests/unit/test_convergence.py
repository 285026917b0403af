"""Algorithm 1 (partial convergence test) on hand-made histories with hand-computed expectations."""

from __future__ import annotations

import json
import math

import pytest

from prelora_ds.algorithm.convergence import (
    WindowAccumulator,
    layer_changes,
    loss_change,
    module_changes,
    partial_convergence,
    percent_change,
)

# --------------------------------------------------------------------------- percent_change


def test_percent_change_hand_computed():
    # 100 -> 110 is 10 %, 200 -> 190 is 5 % (absolute), 50 -> 50 is 0 %.
    assert percent_change([100.0, 200.0, 50.0], [110.0, 190.0, 50.0]) == pytest.approx([10.0, 5.0, 0.0])


def test_percent_change_is_relative_to_previous_not_current():
    # 100 -> 200 is +100 %, 200 -> 100 is 50 %: the denominator is the previous window.
    assert percent_change([100.0, 200.0], [200.0, 100.0]) == pytest.approx([100.0, 50.0])


def test_percent_change_zero_previous():
    out = percent_change([0.0, 0.0], [0.0, 1e-9])
    assert out[0] == 0.0
    assert out[1] == math.inf


def test_percent_change_negative_previous_uses_magnitude():
    assert percent_change([-2.0], [-1.0]) == pytest.approx([50.0])


def test_percent_change_empty():
    assert percent_change([], []) == []


def test_percent_change_length_mismatch():
    with pytest.raises(ValueError, match="layer count"):
        percent_change([1.0, 2.0], [1.0])


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", ["prev", "cur"])
def test_percent_change_non_finite_raises(bad, where):
    prev, cur = [1.0, 1.0], [1.0, 1.0]
    (prev if where == "prev" else cur)[1] = bad
    with pytest.raises(ValueError, match="finite"):
        percent_change(prev, cur)


# --------------------------------------------------------------------------- module / loss / layer changes

NORMS = {
    "attn.qkv": [[100.0, 200.0], [110.0, 190.0], [110.0, 190.0]],
    "mlp.fc1": [[10.0], [10.0], [12.0]],
}


def test_module_changes_hand_computed():
    # window 1 vs 0: qkv layers 10 % and 5 % -> mean 7.5; fc1 0 %.
    assert module_changes(NORMS, 1) == pytest.approx({"attn.qkv": 7.5, "mlp.fc1": 0.0})
    # window 2 vs 1: qkv unchanged; fc1 10 -> 12 is 20 %.
    assert module_changes(NORMS, 2) == pytest.approx({"attn.qkv": 0.0, "mlp.fc1": 20.0})


def test_module_changes_negative_index_is_from_the_end():
    assert module_changes(NORMS, -1) == module_changes(NORMS, 2)
    assert module_changes(NORMS, -2) == module_changes(NORMS, 1)


@pytest.mark.parametrize("k", [0, 3, -3, 10])
def test_module_changes_index_without_previous_window(k):
    with pytest.raises(ValueError, match="no previous window"):
        module_changes(NORMS, k)


def test_module_changes_modules_disagree_on_window_count():
    with pytest.raises(ValueError, match="different numbers of windows"):
        module_changes({"a": [[1.0], [1.0]], "b": [[1.0]]}, 1)


def test_module_changes_module_without_layers():
    with pytest.raises(ValueError, match="no layers"):
        module_changes({"a": [[], []]}, 1)


def test_module_changes_empty_mapping():
    with pytest.raises(ValueError, match="empty"):
        module_changes({}, 1)


def test_loss_change_hand_computed():
    losses = [4.0, 3.0, 2.97]
    assert loss_change(losses, 1) == pytest.approx(25.0)
    assert loss_change(losses, 2) == pytest.approx(1.0)
    assert loss_change(losses, -1) == loss_change(losses, 2)
    with pytest.raises(ValueError):
        loss_change(losses, 0)
    with pytest.raises(ValueError):
        loss_change([1.0], -1)


def test_layer_changes_uses_last_two_windows():
    assert layer_changes(NORMS) == {"attn.qkv": [0.0, 0.0], "mlp.fc1": pytest.approx([20.0])}


def test_layer_changes_needs_two_windows():
    with pytest.raises(ValueError, match="at least 2"):
        layer_changes({"a": [[1.0, 2.0]]})


# --------------------------------------------------------------------------- partial_convergence


def flat(n: int, layers: int = 2) -> tuple[list[float], dict[str, list[list[float]]]]:
    """n windows where nothing changes: passes as soon as n >= num_windows."""
    return [2.0] * n, {"attn.qkv": [[50.0] * layers for _ in range(n)], "mlp.fc2": [[80.0] * layers for _ in range(n)]}


@pytest.mark.parametrize("num_windows", [2, 3, 4, 5])
def test_too_few_windows_is_false_exactly_n_is_true(num_windows):
    for n in range(num_windows):
        loss, norms = flat(n)
        assert partial_convergence(loss, norms, num_windows, delta_w=1.0, delta_l=5.0) is False
    loss, norms = flat(num_windows)
    assert partial_convergence(loss, norms, num_windows, delta_w=1.0, delta_l=5.0) is True


def test_empty_history_is_false():
    assert partial_convergence([], {"a": []}, 2, 1.0, 5.0) is False


@pytest.mark.parametrize("num_windows", [1, 0, -3])
def test_num_windows_below_two_raises(num_windows):
    loss, norms = flat(4)
    with pytest.raises(ValueError, match="num_windows"):
        partial_convergence(loss, norms, num_windows, 1.0, 5.0)


def test_only_the_last_n_minus_1_pairs_count():
    # pair (0,1) moves 50 % in loss and 100 % in norms; pairs (1,2) and (2,3) are flat.
    loss = [10.0, 5.0, 5.0, 5.0]
    norms = {"m": [[1.0], [2.0], [2.0], [2.0]]}
    assert partial_convergence(loss, norms, 3, delta_w=1.0, delta_l=5.0) is True
    assert partial_convergence(loss, norms, 4, delta_w=1.0, delta_l=5.0) is False


def test_a_failing_pair_inside_the_tested_range_fails():
    # pair (1,2) has a 10 % loss change; the latest pair (2,3) is flat.
    loss = [10.0, 10.0, 11.0, 11.0]
    norms = {"m": [[1.0]] * 4}
    assert partial_convergence(loss, norms, 4, 1.0, 5.0) is False
    assert partial_convergence(loss, norms, 2, 1.0, 5.0) is True


def test_norm_threshold_is_strict():
    # 100 -> 101 is exactly 1.0 %.
    loss = [3.0, 3.0]
    norms = {"m": [[100.0], [101.0]]}
    assert partial_convergence(loss, norms, 2, delta_w=1.0, delta_l=5.0) is False
    assert partial_convergence(loss, norms, 2, delta_w=1.0 + 1e-9, delta_l=5.0) is True
    assert partial_convergence(loss, norms, 2, delta_w=1.0 - 1e-9, delta_l=5.0) is False


def test_loss_threshold_is_strict():
    # 100 -> 95 is exactly 5.0 %.
    loss = [100.0, 95.0]
    norms = {"m": [[7.0], [7.0]]}
    assert partial_convergence(loss, norms, 2, delta_w=1.0, delta_l=5.0) is False
    assert partial_convergence(loss, norms, 2, delta_w=1.0, delta_l=5.0 + 1e-9) is True
    assert partial_convergence(loss, norms, 2, delta_w=1.0, delta_l=5.0 - 1e-9) is False


def test_loss_passes_but_one_module_fails():
    loss = [2.0, 2.0, 2.0]
    norms = {
        "attn.qkv": [[100.0, 100.0], [100.1, 100.0], [100.2, 100.0]],  # well under 1 %
        "mlp.fc1": [[100.0, 100.0], [100.0, 100.0], [102.0, 102.0]],  # 2 % in the last pair
    }
    assert partial_convergence(loss, norms, 3, delta_w=1.0, delta_l=5.0) is False
    assert partial_convergence(loss, norms, 3, delta_w=2.5, delta_l=5.0) is True


def test_norms_pass_but_loss_fails():
    loss = [2.0, 2.0, 1.8]  # 10 % in the last pair
    norms = {"m": [[5.0]] * 3}
    assert partial_convergence(loss, norms, 3, delta_w=1.0, delta_l=5.0) is False
    assert partial_convergence(loss, norms, 3, delta_w=1.0, delta_l=10.5) is True


def test_module_change_is_the_mean_over_layers_not_the_max():
    # layer changes 1.5 % and 0.1 % -> D = 0.8 % < 1 %, although one layer alone is above 1 %.
    loss = [2.0, 2.0]
    norms = {"m": [[100.0, 100.0], [101.5, 100.1]]}
    assert partial_convergence(loss, norms, 2, delta_w=1.0, delta_l=5.0) is True
    assert partial_convergence(loss, norms, 2, delta_w=0.8 - 1e-9, delta_l=5.0) is False


def test_one_layer_per_module():
    loss = [1.0, 1.0, 1.0]
    norms = {"m": [[10.0], [10.05], [10.1]]}  # 0.5 % and ~0.4975 %
    assert partial_convergence(loss, norms, 3, delta_w=0.51, delta_l=1.0) is True
    assert partial_convergence(loss, norms, 3, delta_w=0.5, delta_l=1.0) is False


def test_zero_norm_does_not_crash():
    loss = [1.0, 1.0]
    assert partial_convergence(loss, {"m": [[0.0, 5.0], [0.0, 5.0]]}, 2, 1.0, 5.0) is True
    assert partial_convergence(loss, {"m": [[0.0, 5.0], [1.0, 5.0]]}, 2, 1e300, 5.0) is False


def test_zero_loss_does_not_crash():
    norms = {"m": [[1.0], [1.0]]}
    assert partial_convergence([0.0, 0.0], norms, 2, 1.0, 5.0) is True
    assert partial_convergence([0.0, 0.1], norms, 2, 1.0, 1e300) is False


def test_nan_loss_raises_even_in_an_old_window():
    norms = {"m": [[1.0]] * 4}
    with pytest.raises(ValueError, match="finite"):
        partial_convergence([math.nan, 1.0, 1.0, 1.0], norms, 2, 1.0, 5.0)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_norm_raises(bad):
    with pytest.raises(ValueError, match="finite"):
        partial_convergence([1.0, 1.0, 1.0], {"m": [[1.0, bad], [1.0, 1.0], [1.0, 1.0]]}, 2, 1.0, 5.0)


def test_nan_threshold_raises():
    loss, norms = flat(3)
    with pytest.raises(ValueError, match="thresholds"):
        partial_convergence(loss, norms, 2, math.nan, 5.0)


def test_mismatched_layer_count_across_windows_raises():
    with pytest.raises(ValueError, match="layers"):
        partial_convergence([1.0, 1.0, 1.0], {"m": [[1.0, 1.0], [1.0], [1.0]]}, 2, 1.0, 5.0)


def test_loss_and_norm_window_counts_must_agree():
    with pytest.raises(ValueError, match="loss windows"):
        partial_convergence([1.0, 1.0, 1.0], {"m": [[1.0], [1.0]]}, 2, 1.0, 5.0)


def test_modules_must_agree_on_window_count():
    with pytest.raises(ValueError, match="different numbers of windows"):
        partial_convergence([1.0, 1.0], {"a": [[1.0], [1.0]], "b": [[1.0]]}, 2, 1.0, 5.0)


def test_no_modules_raises():
    with pytest.raises(ValueError, match="empty"):
        partial_convergence([1.0, 1.0], {}, 2, 1.0, 5.0)


def test_returns_a_plain_bool():
    loss, norms = flat(3)
    assert type(partial_convergence(loss, norms, 2, 1.0, 5.0)) is bool


# --------------------------------------------------------------------------- WindowAccumulator


def test_accumulator_loss_is_sample_weighted_and_norms_are_plain_means():
    acc = WindowAccumulator()
    acc.add_sample(10.0, 5.0, {"m": [1.0, 2.0]})  # mean loss 2 over 5 examples
    acc.add_sample(40.0, 10.0, {"m": [3.0, 6.0]})  # mean loss 4 over 10 examples
    assert acc.num_closed == 0 and acc.num_pending == 2
    acc.close_window()
    # (10 + 40) / (5 + 10), not the unweighted (2 + 4) / 2 = 3.
    assert acc.loss_windows == pytest.approx([50.0 / 15.0])
    assert acc.norm_windows == {"m": [[2.0, 4.0]]}
    assert acc.num_closed == 1 and acc.num_pending == 0


def test_accumulator_windows_are_independent():
    acc = WindowAccumulator()
    acc.add_sample(4.0, 2.0, {"m": [1.0]})
    acc.close_window()
    acc.add_sample(3.0, 3.0, {"m": [5.0]})
    acc.close_window()
    assert acc.loss_windows == [2.0, 1.0]
    assert acc.norm_windows == {"m": [[1.0], [5.0]]}


def test_accumulator_close_empty_window_raises():
    acc = WindowAccumulator()
    with pytest.raises(ValueError, match="empty window"):
        acc.close_window()
    acc.add_sample(1.0, 1.0, {"m": [1.0]})
    acc.close_window()
    with pytest.raises(ValueError, match="empty window"):
        acc.close_window()
    assert acc.num_closed == 1


def test_accumulator_zero_count_window_raises_on_close():
    acc = WindowAccumulator()
    acc.add_sample(0.0, 0.0, {"m": [1.0]})
    with pytest.raises(ValueError, match="loss_count 0"):
        acc.close_window()


@pytest.mark.parametrize(("loss_sum", "loss_count"), [(1.0, -1.0), (1.0, 0.0), (math.nan, 1.0), (1.0, math.inf)])
def test_accumulator_rejects_bad_loss(loss_sum, loss_count):
    acc = WindowAccumulator()
    with pytest.raises(ValueError):
        acc.add_sample(loss_sum, loss_count, {"m": [1.0]})
    assert acc.num_pending == 0


def test_accumulator_rejects_nan_norm():
    acc = WindowAccumulator()
    with pytest.raises(ValueError, match="finite"):
        acc.add_sample(1.0, 1.0, {"m": [1.0, math.nan]})


@pytest.mark.parametrize("norms", [{"m": [1.0]}, {"m": [1.0, 2.0], "n": [1.0]}, {"n": [1.0, 2.0]}, {}])
def test_accumulator_rejects_layout_changes(norms):
    acc = WindowAccumulator()
    acc.add_sample(1.0, 1.0, {"m": [1.0, 2.0]})
    acc.close_window()
    with pytest.raises(ValueError):
        acc.add_sample(1.0, 1.0, norms)


def test_accumulator_properties_are_copies():
    acc = WindowAccumulator()
    acc.add_sample(1.0, 1.0, {"m": [1.0]})
    acc.close_window()
    acc.loss_windows.append(9.0)
    acc.norm_windows["m"][0][0] = 9.0
    assert acc.loss_windows == [1.0]
    assert acc.norm_windows == {"m": [[1.0]]}


def _feed(acc: WindowAccumulator, samples) -> None:
    for s in samples:
        if s == "close":
            acc.close_window()
        else:
            acc.add_sample(*s)


SAMPLES = [
    (3.0, 2.0, {"a": [1.0, 2.0], "b": [0.5]}),
    (2.5, 2.0, {"a": [1.1, 2.1], "b": [0.6]}),
    "close",
    (2.0, 2.0, {"a": [1.2, 2.2], "b": [0.7]}),
    "close",
    (1.9, 2.0, {"a": [1.3, 2.3], "b": [0.8]}),  # open window at checkpoint time
]
MORE = [(0.7, 1.0, {"a": [1.4, 2.4], "b": [0.9]}), "close"]


def test_accumulator_state_dict_json_round_trip_mid_window():
    ref = WindowAccumulator()
    _feed(ref, SAMPLES)
    state = json.loads(json.dumps(ref.state_dict()))
    restored = WindowAccumulator()
    restored.load_state_dict(state)
    assert restored.state_dict() == ref.state_dict()
    assert restored.num_pending == 1 and restored.num_closed == 2
    # Continuing after a resume gives bit-identical windows to never stopping.
    _feed(ref, MORE)
    _feed(restored, MORE)
    assert restored.loss_windows == ref.loss_windows
    assert restored.norm_windows == ref.norm_windows
    assert restored.loss_windows[-1] == pytest.approx((1.9 + 0.7) / 3.0)


def test_accumulator_restored_state_still_enforces_layout():
    ref = WindowAccumulator()
    _feed(ref, SAMPLES[:3])
    restored = WindowAccumulator()
    restored.load_state_dict(json.loads(json.dumps(ref.state_dict())))
    with pytest.raises(ValueError):
        restored.add_sample(1.0, 1.0, {"a": [1.0], "b": [1.0]})


def test_accumulator_empty_state_round_trip():
    restored = WindowAccumulator()
    restored.load_state_dict(json.loads(json.dumps(WindowAccumulator().state_dict())))
    assert restored.num_closed == 0 and restored.num_pending == 0
    restored.add_sample(1.0, 1.0, {"x": [3.0]})
    restored.close_window()
    assert restored.norm_windows == {"x": [[3.0]]}


def test_accumulator_load_rejects_bad_state():
    acc = WindowAccumulator()
    _feed(acc, SAMPLES)
    good = acc.state_dict()
    with pytest.raises(ValueError, match="version"):
        WindowAccumulator().load_state_dict({**good, "version": 99})
    with pytest.raises(ValueError, match="loss and norm windows"):
        WindowAccumulator().load_state_dict({**good, "loss_windows": good["loss_windows"][:1]})
    bad_open = {**good["open"], "norm_sums": {"a": [1.0], "b": [1.0]}}
    with pytest.raises(ValueError, match="layout"):
        WindowAccumulator().load_state_dict({**good, "open": bad_open})


def test_accumulator_feeds_partial_convergence():
    acc = WindowAccumulator()
    for loss, norm in [(3.0, 10.0), (2.0, 11.0), (1.99, 11.01), (1.985, 11.02)]:
        acc.add_sample(loss * 4, 4.0, {"attn.qkv": [norm, norm], "mlp.fc1": [norm]})
        acc.close_window()
    assert partial_convergence(acc.loss_windows, acc.norm_windows, 3, delta_w=1.0, delta_l=5.0) is True
    assert partial_convergence(acc.loss_windows, acc.norm_windows, 4, delta_w=1.0, delta_l=5.0) is False
