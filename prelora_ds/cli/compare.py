"""Compare finished runs side by side: a markdown table on stdout and a PNG.

  prelora compare runs/full runs/exp1 runs/exp2            # writes runs/compare_runs.png

Reads each run's summary.json. The figure goes beside the runs unless --out says otherwise: into the run directory
for one run, into the folder the runs share for several (the working folder when they share none).

Reads each run's summary.json. Per run: wall time (`wall_time_s`), switch step, final val top-1, and per
phase (full, relora, warmup, lora as present) the trainable parameters and the time per epoch.

Time per epoch of a phase = the phase's `median_step_s` x steps per epoch (the median ignores the slow
first steps and the switch itself). Steps per epoch is `steps_per_epoch` from summary.json when it is
there; otherwise it is read from the validation history: a validation at the end of epoch e is at step
(e + 1) x steps_per_epoch, and exactly the entries with `epoch` < summary `epochs` (completed epochs) are
end-of-epoch ones (a final validation mid-epoch carries the unfinished epoch's number). A run shorter
than one epoch (or one that never validated at an epoch end) shows n/a. `steps / epochs` is not used: it
over-counts whenever the last epoch is partial.

Run labels are the directory names (the parent is added when two names collide). The PNGs need matplotlib:
pip install 'prelora_ds[plot]'.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prelora_ds.cli import CommandError, require_matplotlib
from prelora_ds.metrics.readers import read_json, scalars
from prelora_ds.metrics.tags import tag

DEFAULT_PNG = "compare_runs.png"
PHASE_ORDER = ["full", "relora", "warmup", "lora"]
PHASE_COLORS = {"full": "tab:blue", "relora": "tab:purple", "warmup": "tab:orange", "lora": "tab:green"}


@dataclass
class RunRow:
    label: str
    wall_time_s: float | None
    switch_step: int | None
    final_top1: float | None
    steps_per_epoch: int | None
    trainable: dict[str, int | None]
    median_step_s: dict[str, float | None]

    def epoch_s(self, phase: str) -> float | None:
        step_s = self.median_step_s.get(phase)
        if step_s is None or self.steps_per_epoch is None:
            return None
        return step_s * self.steps_per_epoch


# ----------------------------------------------------------------------------- reading
def steps_per_epoch(summary: dict[str, Any]) -> int | None:
    """summary `steps_per_epoch`, else from an end-of-epoch validation (see the module docstring)."""
    if summary.get("steps_per_epoch"):
        return int(summary["steps_per_epoch"])
    completed = summary.get("epochs") or 0
    for v in summary.get("val") or []:
        if v["epoch"] < completed:
            return round(v["step"] / (v["epoch"] + 1))
    return None


def default_out(run_dirs: list[Path], name: str = DEFAULT_PNG) -> Path:
    """`name` beside the runs: in the run directory for one run, else in the deepest folder they share (the
    working folder when that is the filesystem's root)."""
    if len(run_dirs) == 1:
        return run_dirs[0] / name
    shared = Path(os.path.commonpath([d.resolve() for d in run_dirs]))
    return (shared if shared != Path(shared.anchor) else Path.cwd()) / name


def labels_for(run_dirs: list[Path]) -> list[str]:
    names = [d.resolve().name for d in run_dirs]
    return [f"{d.resolve().parent.name}/{n}" if names.count(n) > 1 else n for d, n in zip(run_dirs, names, strict=True)]


def load_row(run_dir: Path, label: str) -> RunRow:
    path = run_dir / "summary.json"
    s = read_json(path)
    if s is None:
        raise CommandError(f"{path} does not exist: compare finished runs (a run writes it at its end).")
    phases = {p["name"]: p for p in s.get("phases") or []}
    return RunRow(
        label=label,
        wall_time_s=s.get("wall_time_s"),
        switch_step=s.get("switch_step"),
        final_top1=s.get("final_val_top1"),
        steps_per_epoch=steps_per_epoch(s),
        trainable={n: p.get("trainable_params") for n, p in phases.items()},
        median_step_s={n: p.get("median_step_s") for n, p in phases.items()},
    )


def phases_present(rows: list[RunRow]) -> list[str]:
    present = {p for r in rows for p in r.trainable}
    return [p for p in PHASE_ORDER if p in present] + sorted(present - set(PHASE_ORDER))


# ----------------------------------------------------------------------------- table
def fmt(value: Any, spec: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, spec)


def markdown_table(rows: list[RunRow]) -> str:
    phases = phases_present(rows)
    head = ["run", "wall time (s)", "switch step", "final val top-1 (%)", "steps/epoch"]
    for p in phases:
        head += [f"{p}: trainable params", f"{p}: s/epoch"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r.label,
            fmt(r.wall_time_s, ".1f"),
            fmt(r.switch_step) if r.switch_step is not None else "no switch",
            fmt(r.final_top1, ".2f"),
            fmt(r.steps_per_epoch),
        ]
        for p in phases:
            cells += [fmt(r.trainable.get(p), ","), fmt(r.epoch_s(p), ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- figure
def _bars(ax, labels: list[str], values: list[float | None], color: str, fmt_spec: str, label: str,
          missing: str = "n/a") -> None:
    """One bar per run, its value written on it (`missing` where the run has none)."""
    shown = [v if v is not None else 0.0 for v in values]
    bars = ax.bar(labels, shown, color=color, label=label)
    ax.bar_label(bars, labels=[format(v, fmt_spec) if v is not None else missing for v in values], fontsize=8)
    ax.set_ylim(0, 1.3 * max(shown + [1e-9]))  # room for the labels and the legend
    ax.legend(fontsize=8, loc="upper left")
    ax.tick_params(axis="x", labelrotation=20)


def human(n: float) -> str:
    """2684362 -> 2.68M, 576778 -> 577k."""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}"
    return f"{n:g}"


def _grouped(ax, rows: list[RunRow], phases: list[str], value, fmt_spec: str | None) -> None:
    """One bar group per run, centred on the run's tick: one bar per phase the run has."""
    width = 0.8 / max(1, len(phases))
    seen: set[str] = set()
    for i, r in enumerate(rows):
        present = [(p, value(r, p)) for p in phases if value(r, p) is not None]
        if not present:
            ax.text(i, 0, "n/a", ha="center", va="bottom", fontsize=8, transform=ax.get_xaxis_transform())
        for j, (p, v) in enumerate(present):
            x = i + (j - (len(present) - 1) / 2) * width
            bars = ax.bar([x], [v], width, color=PHASE_COLORS.get(p, "grey"), label=None if p in seen else p)
            ax.bar_label(bars, labels=[human(v) if fmt_spec is None else format(v, fmt_spec)], fontsize=7, padding=2)
            seen.add(p)
    ax.set_xticks(range(len(rows)), [r.label for r in rows], rotation=20)
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.legend(fontsize=8, title="phase", loc="upper right")


def plot(rows: list[RunRow], out: Path) -> Path:
    require_matplotlib()
    import matplotlib.pyplot as plt

    labels = [r.label for r in rows]
    phases = phases_present(rows)
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    a, b, c, d, e, f = axes.flat
    _bars(a, labels, [r.wall_time_s for r in rows], "tab:gray", ".1f", "wall time")
    a.set_title("Wall time")
    a.set_ylabel("seconds")
    _grouped(b, rows, phases, lambda r, p: r.epoch_s(p), ".1f")
    b.set_title("Time per epoch by phase (median step time x steps/epoch)")
    b.set_ylabel("seconds per epoch")
    _grouped(c, rows, phases, lambda r, p: r.trainable.get(p), None)
    c.set_yscale("log")
    counts = [v for r in rows for v in r.trainable.values() if v]
    if counts:
        c.set_ylim(min(counts) / 3, max(counts) * 30)
    c.set_title("Trainable parameters by phase")
    c.set_ylabel("parameters (log scale)")
    _bars(d, labels, [r.final_top1 for r in rows], "tab:red", ".2f", "final val top-1")
    d.set_ylim(0, 115)  # a percentage: the axis ends at 100 (and the labels' room above it)
    d.set_yticks(range(0, 101, 20))
    d.set_title("Final validation top-1")
    d.set_ylabel("top-1 accuracy (%)")
    _bars(e, labels, [r.switch_step for r in rows], "tab:orange", "d", "switch step", missing="no switch")
    e.set_title("PreLoRA switch step")
    e.set_ylabel("optimizer step")
    _grouped(f, rows, phases, lambda r, p: r.median_step_s.get(p), ".3f")
    f.set_title("Median step time by phase")
    f.set_ylabel("seconds per optimizer step")
    for ax in axes.flat:
        ax.set_xlabel("run")
        ax.grid(axis="y", alpha=0.3)
        if ax not in (c, d, a, e):  # the grouped bars: room for their labels and legend
            ax.set_ylim(0, ax.get_ylim()[1] * 1.3)
    fig.suptitle(f"Run {rows[0].label}" if len(rows) == 1 else f"Comparison of {len(rows)} runs")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_time_to_accuracy(run_dirs: list[Path], labels: list[str], out: Path) -> Path | None:
    """Val top-1 against training wall time (each validation's `wall_s`), the switch marked: what a user
    waits for an accuracy. None when no run recorded `wall_s` (runs older than the field)."""
    require_matplotlib()
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    drawn = 0
    for run_dir, label in zip(run_dirs, labels, strict=True):
        s = read_json(run_dir / "summary.json")
        val = [v for v in s.get("val") or [] if "wall_s" in v]
        if not val:
            continue
        (line,) = ax.plot([v["wall_s"] for v in val], [v["top1"] for v in val], marker=".", label=label)
        switch = next((v for v in val if s.get("switch_step") is not None and v["step"] >= s["switch_step"]), None)
        if switch is not None:
            ax.axvline(switch["wall_s"], color=line.get_color(), ls=":", alpha=0.6)
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("training wall time (s)")
    ax.set_ylabel("val top-1 (%)")
    ax.set_title("Time to accuracy (dotted: the PreLoRA switch)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# ----------------------------------------------------------------------------- the switches
def switch_effects(summary: dict[str, Any], target: float = 95.0, tail: int = 5) -> dict[str, Any]:
    """Around each phase change: val top-1 at the last validation at or before it (the switch follows the epoch's
    validation) and at the first after it, and the steps of every validation in the phase it starts; the final
    top-1 and the mean of the last `tail` validations (one validation moves by a few points between epochs at a
    high LR: the means are the steadier measures); the first validation at `target` % (step, wall s)."""
    val = summary.get("val") or []
    phases = summary.get("phases") or []
    changes = []
    for phase in phases[1:]:
        at, end = phase["start_step"], phase.get("end_step")
        before = [v for v in val if v["step"] <= at]
        after = [v for v in val if v["step"] > at]
        changes.append({"to": phase["name"], "step": at, "before": before[-1]["top1"] if before else None,
                        "after": after[0]["top1"] if after else None,
                        "after_step": after[0]["step"] if after else None,
                        "phase_steps": [v["step"] for v in after if end is None or v["step"] <= end]})
    reached = next((v for v in val if v["top1"] >= target), None)
    last = [v["top1"] for v in val[-tail:]]
    return {"changes": changes, "final": summary.get("final_val_top1"),
            "tail_mean": sum(last) / len(last) if last else None,
            "target_step": reached["step"] if reached else None,
            "target_wall_s": reached.get("wall_s") if reached else None}


def mean_top1(summary: dict[str, Any] | None, steps: list[int]) -> float | None:
    """Mean val top-1 of `summary`'s validations at `steps` (None when it has not all of them)."""
    got = [top1_at(summary, s) for s in steps] if summary and steps else [None]
    return None if None in got else sum(got) / len(got)


def top1_at(summary: dict[str, Any], step: int | None) -> float | None:
    return next((v["top1"] for v in summary.get("val") or [] if v["step"] == step), None)


def switch_table(run_dirs: list[Path], labels: list[str], baseline: dict[str, Path] | None = None) -> str:
    """A markdown row per run: top-1 just before / just after each switch (and the baseline run's top-1 at that
    first validation after it), the mean over the phase the switch starts (and the baseline's over the same steps),
    the final top-1 and the mean of the last five validations, and when 95 % was first reached. `baseline`: seed
    label -> the full-training run of that seed (matched by the `_s<seed>` suffix of the run's label)."""
    lines = ["| run | switch | step | top-1 before | top-1 after | full at that step | phase mean | full's mean | "
             "final top-1 | last-5 mean | 95 % at step | 95 % at s |", "|" + "---|" * 12]
    for run_dir, label in zip(run_dirs, labels, strict=True):
        s = read_json(run_dir / "summary.json")
        eff = switch_effects(s)
        seed = label.rsplit("_s", 1)[-1] if "_s" in label else None
        base = read_json(baseline[seed] / "summary.json") if baseline and seed in baseline else None
        rows = eff["changes"] or [{"to": "-", "step": None, "before": None, "after": None, "after_step": None,
                                   "phase_steps": []}]  # fmt: skip
        for i, c in enumerate(rows):
            cells = [label if i == 0 else "", f"-> {c['to']}", fmt(c["step"]), fmt(c["before"], ".1f"),
                     fmt(c["after"], ".1f"), fmt(top1_at(base, c["after_step"]) if base else None, ".1f"),
                     fmt(mean_top1(s, c["phase_steps"]), ".1f"), fmt(mean_top1(base, c["phase_steps"]), ".1f")]
            cells += [fmt(eff["final"], ".2f"), fmt(eff["tail_mean"], ".2f"), fmt(eff["target_step"]),
                      fmt(eff["target_wall_s"], ".0f")] if i == 0 else ["", "", "", ""]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_switch_curves(run_dirs: list[Path], labels: list[str], out: Path) -> Path:
    """Val top-1 (top) and the training loss (bottom) against the optimizer step, each run's switches dotted: what
    the switch does to the model, and when each run reaches its accuracy."""
    require_matplotlib()
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 9), sharex=True)
    for run_dir, label in zip(run_dirs, labels, strict=True):
        s = read_json(run_dir / "summary.json")
        val = s.get("val") or []
        (line,) = top.plot([v["step"] for v in val], [v["top1"] for v in val], marker=".", label=label)
        loss = scalars(run_dir, tag("loss")).get(tag("loss"))
        if loss:
            bottom.plot([step for step, _ in loss], [v for _, v in loss], color=line.get_color(), lw=0.8, alpha=0.8,
                        label=label)
        for phase in (s.get("phases") or [])[1:]:
            for ax in (top, bottom):
                ax.axvline(phase["start_step"], color=line.get_color(), ls=":", alpha=0.6)
    top.axhline(95, color="grey", lw=0.6)
    top.set_ylabel("val top-1 (%)")
    top.set_title("Across the switches (dotted): val top-1 and training loss")
    bottom.set_ylabel("train loss (mean over ranks)")
    bottom.set_xlabel("optimizer step")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="prelora compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dirs", type=Path, nargs="+", help="run directories (each holds summary.json)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"PNG to write (default: {DEFAULT_PNG} in the run directory for one run, else in the "
                             "folder the runs share)")
    parser.add_argument("--curve", type=Path, default=None,
                        help="also a PNG of val top-1 against wall time, written here (default: none)")
    parser.add_argument("--switches", type=Path, default=None,
                        help="also the table of top-1 around each switch and a PNG of top-1 and loss by step, "
                             "written here (default: none)")
    parser.add_argument("--baseline", type=Path, nargs="*", default=[],
                        help="full-training runs named <name>_s<seed>: their top-1 beside each switch of that seed "
                             "(default: none)")
    args = parser.parse_args(argv)
    out = args.out or default_out(args.run_dirs)
    labels = labels_for(args.run_dirs)
    rows = [load_row(d, label) for d, label in zip(args.run_dirs, labels, strict=True)]
    require_matplotlib()  # the PNGs below: fail before the table when matplotlib is not installed
    print(markdown_table(rows))
    print(f"wrote {plot(rows, out)}")
    if args.switches:
        baseline = {d.name.rsplit("_s", 1)[-1]: d for d in args.baseline}
        print(switch_table(args.run_dirs, labels, baseline))
        print(f"wrote {plot_switch_curves(args.run_dirs, labels, args.switches)}")
    if args.curve:
        curve = plot_time_to_accuracy(args.run_dirs, labels, args.curve)
        print(f"wrote {curve}" if curve else "no time-to-accuracy curve: the runs recorded no val wall_s")
    return 0
