"""Algorithm 1 of the PreLoRA paper: the partial convergence test (docs/design.md §2).

Pure functions on plain numbers (no torch, no torch.distributed): the trainer all-reduces the loss and
gathers the weight norms, feeds them to a :class:`WindowAccumulator`, and calls
:func:`partial_convergence` on the window means. Every rank holds the same numbers, so every rank
reaches the same decision; a replay tool can run the same functions on a saved ``state_dict``.

Notation (docs/design.md §2): ``W[m][k][l]`` is the mean Frobenius norm of layer ``l`` of target module ``m`` in
window ``k``; ``L[k]`` the sample-weighted mean training loss of window ``k``.

- ``d_{m,l}^k = 100 * |W_{m,l}^k - W_{m,l}^{k-1}| / W_{m,l}^{k-1}``    (:func:`percent_change`)
- ``D_m^k = mean_l d_{m,l}^k``                                           (:func:`module_changes`)
- ``dL^k = 100 * |L^k - L^{k-1}| / L^{k-1}``                             (:func:`loss_change`)
- passes at the latest window ``k`` when every one of the last ``N-1`` pairs has ``dL < delta_l`` and
  ``D_m < delta_w`` for every module ``m`` (strict ``<``).

Edge cases, decided here once:

- A previous value of 0: ``0 -> 0`` is a 0 % change; ``0 -> x != 0`` is ``+inf`` %, which fails any
  finite threshold instead of raising ``ZeroDivisionError`` in the middle of a run.
- The denominator is ``|prev|``, so a change is never negative.
- NaN or infinite inputs raise ``NonFiniteError`` (a ``ValueError``): a diverged run should stop loudly, not sit in
  "not converged yet" forever.
- Mismatched layer counts, modules or window counts raise ``ValueError`` naming what differs.
- ``num_windows < 2`` raises ``ValueError`` (there would be no pair to compare).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from prelora_ds.errors import NonFiniteError

__all__ = [
    "NonFiniteError",
    "WindowAccumulator",
    "layer_changes",
    "loss_change",
    "module_changes",
    "partial_convergence",
    "percent_change",
]


def _check_finite(values: Sequence[float], what: str) -> None:
    for i, v in enumerate(values):
        if not math.isfinite(v):
            raise NonFiniteError(
                f"{what}[{i}] is {v}; the convergence test needs finite values (did training diverge?)."
            )


def _pct(prev: float, cur: float) -> float:
    if prev == 0:
        return 0.0 if cur == 0 else math.inf
    return 100.0 * abs(cur - prev) / abs(prev)


def percent_change(prev: Sequence[float], cur: Sequence[float]) -> list[float]:
    """Per-layer 100*|cur-prev|/prev.

    ``prev == 0`` gives 0 when ``cur == 0`` and ``+inf`` otherwise. Raises ``ValueError`` on a length
    mismatch or a non-finite input.
    """
    if len(prev) != len(cur):
        raise ValueError(f"layer count changed between windows: {len(prev)} layers before, {len(cur)} now.")
    _check_finite(prev, "prev")
    _check_finite(cur, "cur")
    return [_pct(p, c) for p, c in zip(prev, cur, strict=True)]


def _window_index(k: int, n: int) -> int:
    """Normalise ``k`` (negative counts from the end) and check window ``k-1`` exists."""
    kk = k + n if k < 0 else k
    if not 1 <= kk < n:
        raise ValueError(f"window index {k} has no previous window in a history of {n} windows (need 1 <= k < {n}).")
    return kk


def num_norm_windows(norm_windows: Mapping[str, Sequence[Sequence[float]]]) -> int:
    """The common window count of all modules; ValueError when empty or when modules disagree."""
    if not norm_windows:
        raise ValueError("norm_windows is empty: no target module to test (were any weight norms collected?).")
    counts = {m: len(w) for m, w in norm_windows.items()}
    if len(set(counts.values())) != 1:
        raise ValueError(f"modules have different numbers of windows: {counts}.")
    return next(iter(counts.values()))


def module_changes(norm_windows: Mapping[str, Sequence[Sequence[float]]], k: int) -> dict[str, float]:
    """``D_m^k``: mean over layers of the percent change of each layer's norm between windows k-1 and k.

    ``k`` may be negative (``-1`` = the latest window), as in Python indexing.
    """
    kk = _window_index(k, num_norm_windows(norm_windows))
    out: dict[str, float] = {}
    for m, windows in norm_windows.items():
        d = percent_change(windows[kk - 1], windows[kk])
        if not d:
            raise ValueError(f"module {m!r} has no layers in window {kk}.")
        out[m] = sum(d) / len(d)
    return out


def loss_change(loss_windows: Sequence[float], k: int) -> float:
    """``dL^k``: percent change of the window loss between windows k-1 and k (``k`` may be negative)."""
    kk = _window_index(k, len(loss_windows))
    return percent_change([loss_windows[kk - 1]], [loss_windows[kk]])[0]


def layer_changes(norm_windows: Mapping[str, Sequence[Sequence[float]]]) -> dict[str, list[float]]:
    """``d_{m,l}`` between the last two windows, per module: the input of Algorithm 2 (``ranks.assign_ranks``)."""
    if num_norm_windows(norm_windows) < 2:
        raise ValueError("layer_changes needs at least 2 closed windows.")
    return {m: percent_change(w[-2], w[-1]) for m, w in norm_windows.items()}


def partial_convergence(
    loss_windows: Sequence[float],
    norm_windows: Mapping[str, Sequence[Sequence[float]]],
    num_windows: int,
    delta_w: float,
    delta_l: float,
) -> bool:
    """Algorithm 1 on window means. norm_windows[module][k][l] = mean norm of layer l in window k.
    False while fewer than num_windows windows exist.

    Passes when, for each of the last ``num_windows - 1`` consecutive window pairs, the loss change is
    ``< delta_l`` and every module's mean layer change is ``< delta_w`` (percent, strict).
    """
    if num_windows < 2:
        raise ValueError(f"num_windows must be >= 2 (the test compares consecutive windows), got {num_windows}.")
    if math.isnan(delta_w) or math.isnan(delta_l):
        raise ValueError(f"thresholds must be numbers, got delta_w={delta_w}, delta_l={delta_l}.")
    n = len(loss_windows)
    n_norm = num_norm_windows(norm_windows)
    if n_norm != n:
        raise ValueError(f"{n} loss windows but {n_norm} norm windows; both must be closed together.")
    # Validate the whole history, not only the part tested, so a bad sample fails at once, not N windows later.
    _check_finite(loss_windows, "loss_windows")
    for m, windows in norm_windows.items():
        for k, w in enumerate(windows):
            if len(w) != len(windows[0]):
                raise ValueError(f"module {m!r}: window {k} has {len(w)} layers, window 0 has {len(windows[0])}.")
            _check_finite(w, f"norm_windows[{m!r}][{k}]")
    if n < num_windows:
        return False
    for k in range(n - num_windows + 1, n):
        if not loss_change(loss_windows, k) < delta_l:
            return False
        if not all(d < delta_w for d in module_changes(norm_windows, k).values()):
            return False
    return True


class WindowAccumulator:
    """Collects samples (loss + per-layer norms) and closes them into window means.

    A sample is what the trainer measures at each sampling point, already reduced over ranks:
    ``loss_sum`` / ``loss_count`` (sum of per-example losses and their count since the last sample) and
    ``norms[module][l]``. At :meth:`close_window` the window's loss is ``sum(loss_sum) / sum(loss_count)``
    (sample-weighted, so a short last epoch weighs less) and each layer's norm is the plain mean of its
    samples (`window_value="mean"`) or its last sample (`"last"`: one value at the window's end, the
    authors' protocol). Both are kept, so a run can be replayed with either. The first sample fixes the
    modules and layer counts; any later mismatch raises.
    """

    _VERSION = 1
    VALUES = ("mean", "last")

    def __init__(self, window_value: str = "mean") -> None:
        if window_value not in self.VALUES:
            raise ValueError(f"window_value must be one of {self.VALUES}, got {window_value!r}.")
        self.window_value = window_value
        self._loss_windows: list[float] = []
        self._windows: dict[str, dict[str, list[list[float]]]] = {v: {} for v in self.VALUES}
        self._layout: dict[str, int] | None = None  # module -> number of layers
        self._reset_open()

    def _reset_open(self) -> None:
        self._loss_sum = 0.0
        self._loss_count = 0.0
        self._norm_sums: dict[str, list[float]] = {}
        self._last: dict[str, list[float]] = {}
        self._num_samples = 0

    @property
    def loss_windows(self) -> list[float]:
        return list(self._loss_windows)

    @property
    def norm_windows(self) -> dict[str, list[list[float]]]:
        """norm_windows[module][k][l] under this accumulator's `window_value`."""
        return self.windows_of(self.window_value)

    def windows_of(self, value: str) -> dict[str, list[list[float]]]:
        return {m: [list(w) for w in ws] for m, ws in self._windows[value].items()}

    @property
    def num_closed(self) -> int:
        return len(self._loss_windows)

    @property
    def num_pending(self) -> int:
        """Samples in the open (not yet closed) window."""
        return self._num_samples

    def _check_layout(self, norms: Mapping[str, Sequence[float]]) -> None:
        layout = {m: len(v) for m, v in norms.items()}
        if not layout:
            raise ValueError("a sample needs the norms of at least one target module.")
        if self._layout is not None and layout != self._layout:
            raise ValueError(f"sample modules/layer counts {layout} differ from the first sample's {self._layout}.")
        for m, v in norms.items():
            if not v:
                raise ValueError(f"module {m!r} has no layers.")
            _check_finite(v, f"norms[{m!r}]")

    def add_sample(self, loss_sum: float, loss_count: float, norms: Mapping[str, Sequence[float]]) -> None:
        """Add one sample to the open window (loss_sum over loss_count examples; norms[module][layer])."""
        _check_finite([loss_sum, loss_count], "(loss_sum, loss_count)")
        if loss_count < 0 or (loss_count == 0 and loss_sum != 0):
            raise ValueError(f"loss_count must be >= 0 (and 0 only with loss_sum 0), got {loss_sum}/{loss_count}.")
        self._check_layout(norms)
        if self._layout is None:
            self._layout = {m: len(v) for m, v in norms.items()}
        self._loss_sum += loss_sum
        self._loss_count += loss_count
        for m, v in norms.items():
            acc = self._norm_sums.setdefault(m, [0.0] * len(v))
            for i, x in enumerate(v):
                acc[i] += float(x)
            self._last[m] = [float(x) for x in v]
        self._num_samples += 1

    def close_window(self) -> None:
        """Append the open window's means to the history and start a new window."""
        if self._num_samples == 0:
            raise ValueError("close_window() on an empty window: add at least one sample first.")
        if self._loss_count <= 0:
            raise ValueError("close_window(): the window's samples have loss_count 0, so its mean loss is undefined.")
        self._loss_windows.append(self._loss_sum / self._loss_count)
        for m, sums in self._norm_sums.items():
            self._windows["mean"].setdefault(m, []).append([s / self._num_samples for s in sums])
            self._windows["last"].setdefault(m, []).append(list(self._last[m]))
        self._reset_open()

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable state, including the open window (for a resume mid-window)."""
        return {
            "version": self._VERSION,
            "loss_windows": list(self._loss_windows),
            "window_value": self.window_value,
            "norm_windows": self.norm_windows,
            "norm_windows_mean": self.windows_of("mean"),
            "norm_windows_last": self.windows_of("last"),
            "open": {
                "loss_sum": self._loss_sum,
                "loss_count": self._loss_count,
                "norm_sums": {m: list(v) for m, v in self._norm_sums.items()},
                "last": {m: list(v) for m, v in self._last.items()},
                "num_samples": self._num_samples,
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict` output (also after a JSON round trip); validates the content."""
        if state.get("version") != self._VERSION:
            raise ValueError(f"unknown WindowAccumulator state version {state.get('version')!r}.")
        loss = [float(x) for x in state["loss_windows"]]

        def windows(key: str) -> dict[str, list[list[float]]]:
            return {str(m): [[float(x) for x in w] for w in ws] for m, ws in state[key].items()}

        # states written before `window_value` existed hold the means only
        norms = windows("norm_windows_mean" if "norm_windows_mean" in state else "norm_windows")
        last = windows("norm_windows_last") if "norm_windows_last" in state else norms
        op = state["open"]
        sums = {str(m): [float(x) for x in v] for m, v in op["norm_sums"].items()}
        num_samples = int(op["num_samples"])
        if norms:
            num_norm_windows(norms)
            if len(next(iter(norms.values()))) != len(loss):
                raise ValueError("state has different numbers of loss and norm windows.")
        elif loss:
            raise ValueError("state has loss windows but no norm windows.")
        layouts = [{m: len(ws[0]) for m, ws in norms.items()}] if loss else []
        for ws in norms.values():
            if any(len(w) != len(ws[0]) for w in ws):
                raise ValueError("state has windows with different layer counts.")
        if num_samples:
            layouts.append({m: len(v) for m, v in sums.items()})
        elif sums:
            raise ValueError("state has open norm sums but no open samples.")
        if len(layouts) == 2 and layouts[0] != layouts[1]:
            raise ValueError(f"state's open window layout {layouts[1]} differs from its closed windows' {layouts[0]}.")
        self._loss_windows = loss
        self._windows = {"mean": norms, "last": last}
        self._layout = layouts[0] if layouts else None
        self._loss_sum = float(op["loss_sum"])
        self._loss_count = float(op["loss_count"])
        self._norm_sums = sums
        # an open window from before `window_value` existed: its mean stands in for its last sample
        self._last = {str(m): [float(x) for x in v] for m, v in op.get("last", {}).items()} or {
            m: [x / num_samples for x in v] for m, v in sums.items()
        }
        self._num_samples = num_samples
