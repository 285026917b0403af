"""Replay a run's PreLoRA switch decision at other thresholds, from its windows.json (no training).

  prelora replay runs/demo --delta_w 1 5 --delta_l 1 5 --num_windows 2 3
  prelora replay runs/demo --json replay.json   # the run's own thresholds

For every (delta_w, delta_l, num_windows) of the grid (each defaults to the run's own value), the first closed
window k at which `prelora_ds.algorithm.policy.switch_decision` says switch is the switch: the very function the trainer
decides with, on the windows the run recorded (`--window_value mean|last`: each window's mean of samples or its
last sample; both are recorded), with the run's `prelora.min_epochs` and `max_epochs` (config.yaml).
Ranks are `policy.switch_ranks(windows up to k, layers, r_min, r_max)` (the trainer's own choice),
printed as a count per rank (`8:10 16:4 ...`).

With relora enabled, windows.json holds the windows of the `relora` phase (the trainer restarts them
there, on the effective weights), so the replay is of those.

`max_epochs` forcing is replayed where a window closes; a run whose windows are longer than the epochs between
`max_epochs` and the next window close is forced earlier by the trainer (at that epoch's end) than here. A
forced row says so in its note. Windows stop being recorded once the run switched, so a stricter setting than
the run's may print "not reached (windows end at step S)".

Trainable parameters in the `lora` phase = sum over target layers of r * (in_features + out_features)
(LoRA A and B, no bias) + the parameters `prelora_ds.lora.inject.set_trainable` leaves trainable in `lora`
(`prelora.trainable_extra`: head, norm, fc_norm, blocks.N.norm1/2), counted on the timm model built on the
meta device from config.yaml (`model.name`, `model.kwargs`). The number of classes comes from, in order:
--num_classes; `num_classes` in summary.json (the trainer writes it at the run's end); for a run without it
(still running), config.yaml's data section: digits (10), synthetic (`synthetic_num_classes`), the class
folders of an imagefolder or the index.json of a shard set at `data.root`, when that folder is on this machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prelora_ds.algorithm.policy import Clock, Decision, switch_decision, switch_ranks
from prelora_ds.cli import CommandError
from prelora_ds.config.sections import DataConfig, PreLoRAConfig
from prelora_ds.metrics.readers import read_json


@dataclass
class Replay:
    """One grid point's outcome."""

    delta_w: float
    delta_l: float
    num_windows: int
    reached: bool
    window: int | None = None
    switch_step: int | None = None
    switch_epoch: int | None = None
    rank_counts: dict[int, int] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)
    trainable_lora: int | None = None
    note: str = ""


# ----------------------------------------------------------------------------- inputs
def read_windows(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "windows.json"
    windows = read_json(path)
    if windows is None:
        raise CommandError(f"{path} does not exist: a run writes it at its first closed window (prelora.enabled).")
    return windows


def read_config(run_dir: Path):
    from prelora_ds.config.recipe import load_recipe

    return load_recipe(run_dir / "config.yaml")


def checks_by_window(windows: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """windows.json `checks` (one record per closed window: step, epoch) keyed by index into `loss_windows`.

    The windows are the current accumulator's, so they match the last len(loss_windows) checks (with
    relora, the trainer restarts the windows when `relora` starts, but keeps the earlier checks).
    """
    n = len(windows.get("loss_windows", []))
    checks = windows.get("checks", [])
    tail = checks[len(checks) - n :] if n else []
    if len(tail) != n or any(int(c.get("window", k)) != k for k, c in enumerate(tail)):
        raise CommandError(
            f"windows.json: the last {n} checks do not match the {n} closed windows (window 0..{n - 1})."
        )
    return dict(enumerate(tail))


# ----------------------------------------------------------------------------- the replay
def first_passing_window(windows: dict[str, Any], p: PreLoRAConfig) -> tuple[int, Decision] | None:
    """The first closed window k at which the trainer's decision (`policy.switch_decision`) is to switch, with
    that decision, under the PreLoRA settings `p` (thresholds, N, min_epochs, max_epochs); None if none."""
    loss, norms = windows["loss_windows"], windows["norm_windows"]
    checks = checks_by_window(windows)
    step_windows = windows.get("thresholds", {}).get("window_steps") is not None
    for k in range(len(loss)):
        check = checks.get(k, {"epoch": 0})  # windows close mid-epoch (steps) or at an epoch's end (epochs)
        clock = Clock(int(check.get("step", 0)), int(check["epoch"]), epoch_end=not step_windows)
        history = {m: w[: k + 1] for m, w in norms.items()}
        decision = switch_decision(loss[: k + 1], history, clock.epochs_done, p, relora_active=False)
        if decision.switch:
            return k, decision
    return None


def ranks_at(windows: dict[str, Any], k: int, r_min: int, r_max: int) -> dict[str, int]:
    """Full layer name -> rank, as the trainer assigns them when it switches at window k (each module's own bounds
    when the run recorded them: prelora.rank_reference_width; r_min..r_max otherwise)."""
    norm_windows = {m: w[: k + 1] for m, w in windows["norm_windows"].items()}
    recorded = windows.get("thresholds", {}).get("rank_bounds")
    bounds = {m: (int(lo), int(hi)) for m, (lo, hi) in recorded.items()} if recorded else None
    return switch_ranks(norm_windows, windows["layers"], r_min, r_max, bounds)[1]


def rank_counts(ranks: dict[str, int]) -> dict[int, int]:
    return dict(sorted(Counter(ranks.values()).items()))


# ----------------------------------------------------------------------------- parameter count
def _meta_model(cfg, num_classes: int):
    import torch

    from prelora_ds.engine.model import create_model

    with torch.device("meta"):
        return create_model(cfg.model, num_classes, init=False)


def classes_from_data(data: DataConfig) -> tuple[int | None, str]:
    """(the number of classes config.yaml's data section determines, or None; what it was read from, or why not)."""
    from prelora_ds.errors import ConfigError

    if data.dataset == "digits":
        return 10, "digits"
    if data.dataset == "synthetic":
        return data.synthetic_num_classes, "data.synthetic_num_classes"
    root = Path(data.root or "").expanduser()
    try:
        if data.dataset == "imagefolder":
            from prelora_ds.data.images import check_imagefolder

            return len(check_imagefolder(root)), f"the class folders of {root}"
        if data.dataset == "shards":
            from prelora_ds.data.shards import read_index

            return len(read_index(root)["classes"]), f"{root / 'index.json'}"
    except ConfigError as exc:
        return None, str(exc)
    return None, f"data.dataset={data.dataset!r} is unknown"


def resolve_num_classes(run_dir: Path, cfg, given: int | None) -> tuple[int, str]:
    """(number of classes, where it came from); CommandError when nothing tells."""
    if given is not None:
        return given, "--num_classes"
    summary = read_json(run_dir / "summary.json")
    if summary and summary.get("num_classes") is not None:
        return int(summary["num_classes"]), "summary.json"
    found, where = classes_from_data(cfg.data)
    if found is not None:
        return found, f"config.yaml data.dataset={cfg.data.dataset}: {where}"
    state = "its summary.json has no num_classes" if summary is not None else "it has no summary.json yet"
    raise CommandError(
        f"cannot tell the number of classes of {run_dir}: {state}, and config.yaml's data section does not tell "
        f"({where}); pass --num_classes."
    )


class ParamCounter:
    """Trainable parameters of the `lora` phase for given ranks, on a meta-device model (no memory)."""

    def __init__(self, cfg, num_classes: int) -> None:
        from prelora_ds.engine.model import count_params
        from prelora_ds.lora.inject import PHASES, set_trainable

        self.model = _meta_model(cfg, num_classes)
        set_trainable(self.model, PHASES["lora"], cfg.prelora.trainable_extra)  # no LoRA yet: only the extras
        self.extra = count_params(self.model)[0]

    def lora(self, ranks: dict[str, int]) -> int:
        total = 0
        for name, r in ranks.items():
            layer = self.model.get_submodule(name)
            total += r * (layer.in_features + layer.out_features)
        return total + self.extra


# ----------------------------------------------------------------------------- grid and output
def replay_grid(
    windows: dict[str, Any],
    grid: list[tuple[float, float, int]],
    p: PreLoRAConfig,
    r_min: int,
    r_max: int,
    counter: ParamCounter | None,
) -> list[Replay]:
    """One row per (delta_w, delta_l, num_windows): `p` (the run's PreLoRA settings) with those replaced."""
    checks = checks_by_window(windows)
    last = max(checks.values(), key=lambda c: c["step"], default=None)
    rows = []
    for dw, dl, n in grid:
        point = dataclasses.replace(p, delta_w=dw, delta_l=dl, num_windows=n)
        found = first_passing_window(windows, point) if windows["loss_windows"] else None
        if found is None:
            end = f"windows end at step {last['step']}" if last else "no closed windows"
            rows.append(Replay(dw, dl, n, reached=False, note=f"not reached ({end})"))
            continue
        k, decision = found
        ranks = ranks_at(windows, k, r_min, r_max)
        check = checks.get(k, {})
        rows.append(
            Replay(
                dw,
                dl,
                n,
                reached=True,
                window=k,
                switch_step=check.get("step"),
                switch_epoch=check.get("epoch"),
                rank_counts=rank_counts(ranks),
                ranks=ranks,
                trainable_lora=counter.lora(ranks) if counter else None,
                note="" if decision.passed else decision.reason,
            )
        )
    return rows


def format_counts(counts: dict[int, int]) -> str:
    return " ".join(f"{r}:{c}" for r, c in sorted(counts.items()))


def format_table(rows: list[Replay]) -> str:
    head = [
        "delta_w %",
        "delta_l %",
        "N",
        "switch step",
        "switch epoch",
        "window",
        "ranks (rank:count)",
        "trainable (lora)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.reached:
            cells = [
                r.switch_step,
                r.switch_epoch,
                r.window,
                format_counts(r.rank_counts),
                f"{r.trainable_lora:,}" if r.trainable_lora is not None else "n/a",
            ]
        else:
            cells = [r.note, "", "", "", ""]
        lines.append(
            "| " + " | ".join(str(c) for c in [f"{r.delta_w:g}", f"{r.delta_l:g}", r.num_windows, *cells]) + " |"
        )
    return "\n".join(lines)


def run_header(run_dir: Path, windows: dict[str, Any], min_epochs: int | None) -> str:
    t = windows.get("thresholds", {})
    checks = list(checks_by_window(windows).values())
    span = f"steps {checks[0]['step']}..{checks[-1]['step']}" if checks else "none"
    summary = read_json(run_dir / "summary.json")
    if summary is None:
        own = "the run has no summary.json yet"
    else:
        step = summary.get("switch_step")
        own = "the run did not switch" if step is None else f"the run switched at step {step}"
    return (
        f"run {run_dir}: {len(checks)} closed windows ({span}); own thresholds delta_w={t.get('delta_w')} "
        f"delta_l={t.get('delta_l')} N={t.get('num_windows')}, min_epochs={min_epochs}; {own}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="prelora replay", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path, help="a run directory (windows.json, config.yaml)")
    parser.add_argument("--delta_w", type=float, nargs="+", help="weight-norm thresholds, %% (default: the run's)")
    parser.add_argument("--delta_l", type=float, nargs="+", help="loss thresholds, %% (default: the run's)")
    parser.add_argument("--num_windows", type=int, nargs="+", help="N values, >= 2 (default: the run's)")
    parser.add_argument("--num_classes", type=int, default=None,
                        help="the number of classes (default: summary.json's, else config.yaml's data section)")
    parser.add_argument(
        "--window_value", choices=("mean", "last"), default=None,
        help="a window's norm: the mean of its samples or its last sample (default: the run's prelora.window_value)",
    )
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the table as JSON")
    args = parser.parse_args(argv)
    windows = read_windows(args.run_dir)
    cfg = read_config(args.run_dir)
    value = args.window_value or cfg.prelora.window_value
    key = f"norm_windows_{value}"
    if key not in windows:
        if value != cfg.prelora.window_value:
            parser.error(f"{args.run_dir}/windows.json predates prelora.window_value: it has only its own windows")
        key = "norm_windows"
    windows["norm_windows"] = windows[key]  # the windows every replay below reads
    t = windows.get("thresholds", {})
    grid_w = args.delta_w or [t.get("delta_w", cfg.prelora.delta_w)]
    grid_l = args.delta_l or [t.get("delta_l", cfg.prelora.delta_l)]
    grid_n = args.num_windows or [t.get("num_windows", cfg.prelora.num_windows)]
    if min(grid_n) < 2:
        parser.error("--num_windows values must be >= 2 (the test compares consecutive windows)")
    if min(grid_w + grid_l) <= 0:
        parser.error("--delta_w / --delta_l values must be > 0 (percentages)")
    r_min, r_max = t.get("r_min", cfg.prelora.r_min), t.get("r_max", cfg.prelora.r_max)
    min_epochs = cfg.prelora.min_epochs
    if args.window_value:
        cfg.prelora.window_value = args.window_value
    num_classes, source = resolve_num_classes(args.run_dir, cfg, args.num_classes)
    counter = ParamCounter(cfg, num_classes)
    grid = [(w, lo, n) for w in grid_w for lo in grid_l for n in grid_n]
    rows = replay_grid(windows, grid, cfg.prelora, r_min, r_max, counter)
    print(run_header(args.run_dir, windows, min_epochs) + f"; window value: {value}")
    ranks_text = f"{r_min}..{r_max}"
    bounds = {f"{lo}..{hi}" for lo, hi in (t.get("rank_bounds") or {}).values()}
    if bounds - {ranks_text}:  # prelora.rank_reference_width scaled them to this model's widths
        ranks_text += f" at width {t.get('rank_reference_width')} ({', '.join(sorted(bounds))} on this model)"
    print(f"num_classes={num_classes} ({source}); ranks {ranks_text}; max_epochs={cfg.prelora.max_epochs} "
          "(forcing replayed at window closes only)")
    print(format_table(rows))
    if args.json:
        payload = {
            "run_dir": str(args.run_dir),
            "num_classes": num_classes,
            "num_classes_source": source,
            "min_epochs": min_epochs,
            "window_value": value,
            "rows": [asdict(r) for r in rows],
        }
        args.json.write_text(json.dumps(payload, indent=1))
        print(f"wrote {args.json}")
    return 0
