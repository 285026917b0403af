"""Time to accuracy: PreLoRA runs against full training of the same seeds, in training wall time.

  prelora time-to-accuracy runs/study/relaxed_s* --baseline runs/study/full_s*   # runs/study/time_to_accuracy.*

The runs are paired by seed: `train.seed` of each run's config.yaml, else the `_s<seed>` suffix of its folder
(tools/run_study.py's names). A pair's target is the full run's final val top-1 less --margin points; a run's time
to it is the training wall time (`wall_s`) of its first validation at or above it ("never" when none is: a run is
only measured at its validations). Per pair: wall time (`wall_time_s`), final val top-1, the switch step, each
phase's median step time over the full run's `full` one, and both runs' times to the target. The mean row gives
the mean and the spread (min-max) over the pairs; the ratios there are means of the per-pair ratios (the time to
target's over the pairs where both runs reached it), so that each seed weighs the same.

Prints the markdown table and writes it (time_to_accuracy.md), every number (.json) and val top-1 against wall
time for every run (.png: full in blue, the candidates in orange, the targets dashed, each run's first validation
at its target starred) into --out. The PNG needs matplotlib: pip install 'prelora_ds[plot]'.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from prelora_ds.cli import CommandError, HelpFormatter, require_matplotlib
from prelora_ds.cli.compare import PHASE_ORDER, default_out, fmt, labels_for
from prelora_ds.metrics.readers import read_json

STEM = "time_to_accuracy"
DEFAULT_MARGIN = 1.0
COLORS = ("tab:blue", "tab:orange")  # baseline, candidate
SEED_SUFFIX = re.compile(r"_s(\d+)$")
EPS = 1e-9  # a top-1 equal to the target up to float rounding (final - margin) reaches it


@dataclass(frozen=True)
class Run:
    label: str
    seed: int
    summary: dict[str, Any]


@dataclass(frozen=True)
class RunStats:
    label: str
    wall_time_s: float | None
    final_val_top1: float | None
    switch_step: int | None
    median_step_s: dict[str, float | None]  # phase -> seconds
    step_ratio: dict[str, float | None]  # phase -> median step over the paired full run's `full` median step
    target_step: int | None  # the first validation at the pair's target; None: never reached
    target_wall_s: float | None
    target_top1: float | None


@dataclass(frozen=True)
class PairStats:
    seed: int
    target: float  # the full run's final top-1 less the margin
    baseline: RunStats
    candidate: RunStats
    wall_ratio: float | None  # candidate / baseline
    target_ratio: float | None  # candidate's time to target / baseline's; None unless both reached it


# ----------------------------------------------------------------------------- reading and pairing
def run_seed(run_dir: Path) -> int | None:
    """`train.seed` of the run's config.yaml, else the `_s<seed>` suffix of its folder."""
    config = run_dir / "config.yaml"
    if config.is_file():
        seed = ((yaml.safe_load(config.read_text()) or {}).get("train") or {}).get("seed")
        if seed is not None:
            return int(seed)
    match = SEED_SUFFIX.search(run_dir.resolve().name)
    return int(match.group(1)) if match else None


def load_run(run_dir: Path, label: str) -> Run:
    summary = read_json(run_dir / "summary.json")
    if summary is None:
        raise CommandError(f"{run_dir / 'summary.json'} does not exist: compare finished runs.")
    seed = run_seed(run_dir)
    if seed is None:
        raise CommandError(f"{run_dir}: no train.seed in config.yaml and no _s<seed> suffix to pair it by.")
    return Run(label, seed, summary)


def pair_by_seed(baseline: list[Run], candidates: list[Run]) -> list[tuple[Run, Run]]:
    """(baseline, candidate) of each candidate's seed, by seed. A seed twice on one side would pair ambiguously
    (two arms at once: run the command once per arm); a baseline without a candidate is left out."""
    for side, runs in (("baseline", baseline), ("candidate", candidates)):
        seeds = [r.seed for r in runs]
        if twice := sorted({s for s in seeds if seeds.count(s) > 1}):
            raise CommandError(f"several {side} runs of seed {twice[0]}: give one run per seed on each side.")
    by_seed = {r.seed: r for r in baseline}
    if missing := [f"{c.label} (seed {c.seed})" for c in candidates if c.seed not in by_seed]:
        raise CommandError(f"no baseline run of the seed of {', '.join(missing)}.")
    return [(by_seed[c.seed], c) for c in sorted(candidates, key=lambda r: r.seed)]


# ----------------------------------------------------------------------------- measuring
def first_reach(summary: dict[str, Any], target: float) -> dict[str, Any] | None:
    """The first validation with top-1 at or above `target` (None: the run never reached it)."""
    return next((v for v in summary.get("val") or [] if v["top1"] >= target - EPS), None)


def median_steps(summary: dict[str, Any]) -> dict[str, float | None]:
    return {p["name"]: p.get("median_step_s") for p in summary.get("phases") or []}


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def run_stats(run: Run, target: float, full_step_s: float | None) -> RunStats:
    s = run.summary
    reached = first_reach(s, target) or {}
    steps = median_steps(s)
    return RunStats(
        label=run.label, wall_time_s=s.get("wall_time_s"), final_val_top1=s.get("final_val_top1"),
        switch_step=s.get("switch_step"), median_step_s=steps,
        step_ratio={name: ratio(v, full_step_s) for name, v in steps.items()},
        target_step=reached.get("step"), target_wall_s=reached.get("wall_s"), target_top1=reached.get("top1"),
    )


def pair_stats(baseline: Run, candidate: Run, margin: float = DEFAULT_MARGIN) -> PairStats:
    final = baseline.summary.get("final_val_top1")
    if final is None:
        raise CommandError(f"{baseline.label}: summary.json has no final_val_top1, which the target is set from.")
    target = final - margin
    full_step_s = median_steps(baseline.summary).get("full")
    b, c = run_stats(baseline, target, full_step_s), run_stats(candidate, target, full_step_s)
    return PairStats(seed=baseline.seed, target=target, baseline=b, candidate=c,
                     wall_ratio=ratio(c.wall_time_s, b.wall_time_s),
                     target_ratio=ratio(c.target_wall_s, b.target_wall_s))


def spread(values: Iterable[float | None]) -> dict[str, float] | None:
    """Mean, min, max and count of the values present (None when none is)."""
    got = [v for v in values if v is not None]
    if not got:
        return None
    return {"mean": statistics.fmean(got), "min": min(got), "max": max(got), "n": len(got)}


def phases_of(runs: list[RunStats]) -> list[str]:
    present = {p for r in runs for p in r.median_step_s}
    return [p for p in PHASE_ORDER if p in present] + sorted(present - set(PHASE_ORDER))


def arm_summary(runs: list[RunStats]) -> dict[str, Any]:
    phases = phases_of(runs)
    return {
        **{key: spread(getattr(r, key) for r in runs)
           for key in ("wall_time_s", "final_val_top1", "switch_step", "target_wall_s", "target_step")},
        "median_step_s": {p: spread(r.median_step_s.get(p) for r in runs) for p in phases},
        "step_ratio": {p: spread(r.step_ratio.get(p) for r in runs) for p in phases},
    }


def summarize(pairs: list[PairStats]) -> dict[str, Any]:
    return {
        "pairs": len(pairs),
        "target": spread(p.target for p in pairs),
        "baseline": arm_summary([p.baseline for p in pairs]),
        "candidate": arm_summary([p.candidate for p in pairs]),
        "wall_ratio": spread(p.wall_ratio for p in pairs),
        "target_ratio": spread(p.target_ratio for p in pairs),
    }


def arm_name(labels: list[str], default: str) -> str:
    """The runs' shared name less `_s<seed>` (relaxed_s0, relaxed_s1 -> relaxed), else `default`."""
    names = {SEED_SUFFIX.sub("", label.rsplit("/", 1)[-1]) for label in labels}
    return names.pop() if len(names) == 1 else default


# ----------------------------------------------------------------------------- table
def reach_cell(r: RunStats) -> str:
    if r.target_step is None:
        return "never"
    return f"{fmt(r.target_wall_s, '.1f')} (step {r.target_step})"


def spread_cell(s: dict[str, float] | None, spec: str, total: int) -> str:
    """`mean (min-max)`, and how many pairs had the value when not all did (the time to target)."""
    if s is None:
        return "n/a"
    text = f"{s['mean']:{spec}} ({s['min']:{spec}}-{s['max']:{spec}})"
    return text if s["n"] == total else f"{text}, {s['n']}/{total}"


def markdown_table(pairs: list[PairStats], summary: dict[str, Any], names: tuple[str, str]) -> str:
    base, cand = names
    phases = list(summary["candidate"]["step_ratio"])
    head = ["seed", f"{base} wall (s)", f"{base} top-1", f"{cand} wall (s)", "switch step", f"{cand} top-1",
            "wall ratio", "target top-1", f"{base} to target (s)", f"{cand} to target (s)", "to-target ratio",
            *[f"{p} step / {base}'s" for p in phases]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in pairs:
        b, c = p.baseline, p.candidate
        lines.append("| " + " | ".join([
            str(p.seed), fmt(b.wall_time_s, ".1f"), fmt(b.final_val_top1, ".2f"), fmt(c.wall_time_s, ".1f"),
            fmt(c.switch_step) if c.switch_step is not None else "no switch", fmt(c.final_val_top1, ".2f"),
            fmt(p.wall_ratio, ".3f"), f"{p.target:.2f}", reach_cell(b), reach_cell(c), fmt(p.target_ratio, ".3f"),
            *[fmt(c.step_ratio.get(ph), ".2f") for ph in phases]]) + " |")
    n, sb, sc = len(pairs), summary["baseline"], summary["candidate"]
    lines.append("| " + " | ".join([
        "mean (min-max)", spread_cell(sb["wall_time_s"], ".1f", n), spread_cell(sb["final_val_top1"], ".2f", n),
        spread_cell(sc["wall_time_s"], ".1f", n), spread_cell(sc["switch_step"], ".0f", n),
        spread_cell(sc["final_val_top1"], ".2f", n), spread_cell(summary["wall_ratio"], ".3f", n),
        spread_cell(summary["target"], ".2f", n), spread_cell(sb["target_wall_s"], ".1f", n),
        spread_cell(sc["target_wall_s"], ".1f", n), spread_cell(summary["target_ratio"], ".3f", n),
        *[spread_cell(sc["step_ratio"][ph], ".2f", n) for ph in phases]]) + " |")
    return "\n".join(lines)


def headline(summary: dict[str, Any], names: tuple[str, str], margin: float) -> str:
    """One sentence under the table: the two ratios a reader wants first."""
    base, cand = names
    wall, tta, n = summary["wall_ratio"], summary["target_ratio"], summary["pairs"]
    to_target = (f"{tta['mean']:.3f} x {base}'s time to its final top-1 - {margin:g} (over {tta['n']} of {n} pairs)"
                 if tta else f"no pair where both reached {base}'s final top-1 - {margin:g}")
    return f"{cand}: {fmt(wall and wall['mean'], '.3f')} x {base}'s wall time (mean of {n} pairs); {to_target}."


# ----------------------------------------------------------------------------- figure
def draw(ax, runs: list[tuple[Run, Run]], pairs: list[PairStats], names: tuple[str, str]) -> None:
    """Every run's top-1 against wall time on `ax`, each seed's target dashed, each first crossing starred."""
    labelled: set[str] = set()

    def once(label: str) -> str | None:  # one legend entry per kind of line
        seen = label in labelled
        labelled.add(label)
        return None if seen else label

    for (base, cand), p in zip(runs, pairs, strict=True):
        for run, stats, color, name in ((base, p.baseline, COLORS[0], names[0]),
                                        (cand, p.candidate, COLORS[1], names[1])):
            val = [v for v in run.summary.get("val") or [] if "wall_s" in v]
            ax.plot([v["wall_s"] for v in val], [v["top1"] for v in val], color=color, marker=".", ms=3, lw=1,
                    alpha=0.7, label=once(name))
            if stats.target_wall_s is not None:
                ax.plot(stats.target_wall_s, stats.target_top1, marker="*", ms=13, color=color, mec="black",
                        ls="none")
        ax.axhline(p.target, color="grey", ls="--", lw=0.8, label=once(f"target: {names[0]}'s final top-1 - margin"))
    # the stars' legend entry in neither arm's colour: they mark both
    ax.plot([], [], marker="*", ms=13, color="white", mec="black", ls="none", label="first validation at the target")
    ax.set_xlabel("training wall time (s)")
    ax.set_ylabel("val top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")


def plot(runs: list[tuple[Run, Run]], pairs: list[PairStats], names: tuple[str, str], out: Path) -> Path:
    """Top-1 against wall time for every run, whole (left) and near the targets (right)."""
    require_matplotlib()
    import matplotlib.pyplot as plt

    fig, (whole, near) = plt.subplots(1, 2, figsize=(15, 6))
    for ax in (whole, near):
        draw(ax, runs, pairs, names)
    targets = [p.target for p in pairs]
    val = [v for pair in runs for run in pair for v in run.summary.get("val") or [] if "wall_s" in v]
    low = min(targets) - 5
    near.set_ylim(low, max([v["top1"] for v in val] + targets) + 1)
    if shown := [v["wall_s"] for v in val if v["top1"] >= low]:  # the right panel from where a run comes near
        near.set_xlim(0.95 * min(shown), 1.02 * max(v["wall_s"] for v in val))
    whole.set_title(f"Time to accuracy: {names[1]} against {names[0]}, {len(pairs)} seed(s)")
    near.set_title("Near the targets (one per seed)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# ----------------------------------------------------------------------------- the report
def suffixed(stem: Path, suffix: str) -> Path:
    return stem.parent / f"{stem.name}{suffix}"  # not with_suffix: a stem may hold a dot


def write_report(baseline_dirs: list[Path], candidate_dirs: list[Path], stem: Path,
                 margin: float = DEFAULT_MARGIN) -> str:
    """Pairs and measures the runs, writes stem.md, stem.json and stem.png; returns the markdown."""
    labels = labels_for([*baseline_dirs, *candidate_dirs])
    runs = [load_run(d, label) for d, label in zip([*baseline_dirs, *candidate_dirs], labels, strict=True)]
    baseline, candidates = runs[:len(baseline_dirs)], runs[len(baseline_dirs):]
    paired = pair_by_seed(baseline, candidates)
    pairs = [pair_stats(b, c, margin) for b, c in paired]
    summary = summarize(pairs)
    names = (arm_name([b.label for b, _ in paired], "full"), arm_name([c.label for _, c in paired], "PreLoRA"))
    text = f"{markdown_table(pairs, summary, names)}\n\n{headline(summary, names, margin)}\n"
    stem.parent.mkdir(parents=True, exist_ok=True)
    suffixed(stem, ".md").write_text(text)
    suffixed(stem, ".json").write_text(json.dumps(
        {"margin": margin, "baseline": names[0], "candidate": names[1], "pairs": [asdict(p) for p in pairs],
         "summary": summary}, indent=1))
    plot(paired, pairs, names, suffixed(stem, ".png"))
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prelora time-to-accuracy", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("run_dirs", type=Path, nargs="+", help="the candidate (PreLoRA) runs, one per seed")
    # required: no default to state (argparse's formatter skips a SUPPRESS default)
    parser.add_argument("--baseline", type=Path, nargs="+", required=True, default=argparse.SUPPRESS,
                        help="the full-training runs of the same seeds (after the runs, or end the list with --)")
    parser.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                        help="the target is the full run's final top-1 less this many points")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"folder for {STEM}.md, .json and .png (default: the folder the runs share, the "
                             "working folder when they share none)")
    args = parser.parse_args(argv)
    require_matplotlib()  # fail before anything is written
    dirs = [*args.baseline, *args.run_dirs]
    stem = args.out / STEM if args.out else default_out(dirs, STEM)
    print(write_report(args.baseline, args.run_dirs, stem, args.margin), end="")
    print(f"wrote {stem}.md, {stem}.json, {stem}.png")
    return 0
