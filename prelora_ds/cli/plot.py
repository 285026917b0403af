"""Figures of one PreLoRA run, written as PNGs into RUN_DIR/plots/.

  prelora plot runs/demo
  prelora plot runs/demo --out_dir /tmp/demo_plots

Reads RUN_DIR/tb/ (TensorBoard events; several event files, e.g. after a resume, are merged by step),
summary.json, windows.json and ranks.json (absent when the run never switched). Figures:

| file                | content                                                                            |
|---------------------|------------------------------------------------------------------------------------|
| `weight_norms.png`  | (a) mean weight norm per target module (`4_weight_norm/<module>`; W + s B A after the switch) |
| `layer_changes.png` | (b) per-layer % change d_{m,l} between the last two windows (at the switch)        |
| `ranks.png`         | (c) LoRA rank per module and layer (ranks.json)                                    |
| `lora_norms.png`    | (d) base / LoRA / effective norms after the switch (`lora_norm/...`)               |
| `throughput.png`    | (e) step time and images/s with phases shaded, median step time per phase          |
| `loss_top1.png`     | (f) training loss and validation top-1, phase starts marked                        |

A figure whose data is absent (no switch, no windows, a run without TensorBoard events) is skipped with a
printed note. The last lines list the files written. Needs matplotlib: pip install 'prelora_ds[plot]'.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prelora_ds.algorithm.convergence import layer_changes
from prelora_ds.cli import require_matplotlib
from prelora_ds.metrics.readers import RunData, Series, load_run
from prelora_ds.metrics.tags import tag

require_matplotlib()  # else `prelora plot: error: matplotlib is not installed; pip install 'prelora_ds[plot]'`
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import BoundaryNorm, ListedColormap  # noqa: E402

PHASE_COLORS = {"full": "tab:blue", "relora": "tab:purple", "warmup": "tab:orange", "lora": "tab:green"}
KIND_COLORS = {"base": "tab:blue", "lora": "tab:red", "effective": "tab:green"}
KIND_STYLES = {"base": "-", "lora": "-", "effective": "--"}  # effective ~ base: dashed so both stay visible
FIGSIZE = (11, 5.5)
DPI = 110


class Skip(Exception):
    """A figure's data is absent: the message says what is missing."""


def phases(run: RunData) -> list[dict[str, Any]]:
    """The run's phases (summary.json); empty for a run without one."""
    return (run.summary or {}).get("phases") or []


def last_step(run: RunData) -> int | None:
    """summary.json `steps`, else the last step of any TensorBoard scalar; None when neither is there."""
    if run.summary and run.summary.get("steps") is not None:
        return int(run.summary["steps"])
    steps = [s for series in run.scalars.values() for s, _ in series]
    return max(steps) if steps else None


# ----------------------------------------------------------------------------- helpers
def xy(series: Series) -> tuple[list[int], list[float]]:
    return [s for s, _ in series], [v for _, v in series]


def phase_end(run: RunData, i: int) -> int:
    phase = phases(run)[i]
    end = phase.get("end_step")
    return int(end) if end is not None else int(last_step(run) or phase["start_step"])


def mark_phases(ax: plt.Axes, run: RunData) -> None:
    """A dashed vertical line and a label at the start of every phase after the first."""
    for phase in phases(run)[1:]:
        start, name = phase["start_step"], phase["name"]
        color = PHASE_COLORS.get(name, "black")
        ax.axvline(start, color=color, linestyle="--", linewidth=1.2, label=f"{name} starts (step {start})")
        ax.text(
            start,
            0.98,
            f" {name}",
            transform=ax.get_xaxis_transform(),
            rotation=90,
            va="top",
            ha="right",
            color=color,
            fontsize=9,
        )


def shade_phases(ax: plt.Axes, run: RunData) -> None:
    """A translucent band per phase, labelled for the legend."""
    for i, phase in enumerate(phases(run)):
        name = phase["name"]
        ax.axvspan(
            phase["start_step"],
            phase_end(run, i),
            color=PHASE_COLORS.get(name, "grey"),
            alpha=0.12,
            label=f"phase {name}",
        )


def full_x_range(ax: plt.Axes, run: RunData) -> None:
    if last_step(run):
        ax.set_xlim(0, last_step(run))


def save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def need(run: RunData, prefix: str) -> dict[str, Series]:
    """The scalar series whose tag starts with `prefix`; Skip when there are none."""
    found = {tag: s for tag, s in run.scalars.items() if tag.startswith(prefix) and s}
    if not found:
        raise Skip(f"no TensorBoard scalars {prefix}* in {run.run_dir / 'tb'}")
    return found


# ----------------------------------------------------------------------------- figures
def plot_weight_norms(run: RunData, path: Path) -> Path:
    """(a) 4_weight_norm/<module>: mean Frobenius norm of the module's layers over the whole run: the weight in
    `full`, the effective weight W + s B A once LoRA is injected (what the model computes with)."""
    prefix = tag("norm", module="")
    series = need(run, prefix)
    fig, ax = plt.subplots(figsize=FIGSIZE)
    for name, s in series.items():
        ax.plot(*xy(s), marker=".", label=name.removeprefix(prefix))
    mark_phases(ax, run)
    full_x_range(ax, run)
    ax.set_title("Weight norm per target module (mean over layers; W + s B A after the switch), phase starts marked")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("mean Frobenius norm ||W + s B A||_F")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return save(fig, path)


def switch_changes(run: RunData) -> tuple[dict[str, list[float]], str]:
    """d_{m,l} between the last two closed windows (`convergence.layer_changes`) and a title suffix."""
    w = run.windows or {}
    norm_windows = w.get("norm_windows") or {}
    if not norm_windows or len(next(iter(norm_windows.values()))) < 2:
        raise Skip("windows.json holds fewer than 2 closed windows: no layer change to plot")
    changes = layer_changes(norm_windows)
    steps = [c["step"] for c in w.get("checks", [])][-2:]
    span = f"steps {steps[0]} -> {steps[1]}" if len(steps) == 2 else "last two windows"
    switched = (run.summary or {}).get("switch_step") is not None or run.ranks is not None
    where = "at the switch" if switched else "between the last two windows (the run did not switch)"
    return changes, f"{where}, windows ending at {span}"


def plot_layer_changes(run: RunData, path: Path) -> Path:
    """(b) grouped bars: x = layer index, one bar per module, height = % change of the layer's norm."""
    changes, where = switch_changes(run)
    modules = list(changes)
    n_layers = len(changes[modules[0]])
    width = 0.8 / len(modules)
    fig, ax = plt.subplots(figsize=FIGSIZE)
    has_inf = False
    for j, m in enumerate(modules):
        vals = [v if math.isfinite(v) else float("nan") for v in changes[m]]
        has_inf |= any(math.isinf(v) for v in changes[m])
        ax.bar([i + (j - (len(modules) - 1) / 2) * width for i in range(n_layers)], vals, width, label=m)
    finite = [v for vs in changes.values() for v in vs if math.isfinite(v)]
    delta_w = ((run.windows or {}).get("thresholds") or {}).get("delta_w")
    if delta_w is not None and finite and delta_w <= 2 * max(finite):
        ax.axhline(delta_w, color="black", linestyle=":", label=f"delta_w = {delta_w} % (threshold on the module mean)")
    ax.set_xticks(range(n_layers))
    ax.set_title(f"Per-layer weight-norm change d_m,l {where}" + (" (inf % not drawn)" if has_inf else ""), fontsize=10)
    ax.set_xlabel("layer (block index)")
    ax.set_ylabel("d_m,l: change of ||W||_F between windows (%)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, title="module")
    return save(fig, path)


def layer_groups(run: RunData, names: list[str]) -> dict[str, list[str]]:
    """Module key -> full layer names in layer order: windows.json `layers`, else grouped as the trainer does."""
    layers = (run.windows or {}).get("layers")
    if layers:
        return layers
    from prelora_ds.lora.inject import layer_index, module_key  # imports torch + peft (seconds): only when needed

    groups: dict[str, list[str]] = {}
    for name in sorted(names, key=layer_index):
        groups.setdefault(module_key(name), []).append(name)
    return groups


def rank_matrix(run: RunData) -> tuple[list[str], int, list[list[float]]]:
    """(modules, layer count, ranks[module][layer]) from ranks.json, grouped like windows.json `layers`."""
    if not run.ranks:
        raise Skip("no ranks.json: the run never switched to LoRA")
    layers = layer_groups(run, list(run.ranks))
    modules = list(layers)
    n_layers = max(len(names) for names in layers.values())
    matrix = [[float(run.ranks.get(name, "nan")) for name in layers[m]] for m in modules]
    return modules, n_layers, [row + [float("nan")] * (n_layers - len(row)) for row in matrix]


def plot_ranks(run: RunData, path: Path) -> Path:
    """(c) heatmap modules x layers, one colour per candidate rank, the rank written in each cell."""
    modules, n_layers, matrix = rank_matrix(run)
    values = sorted({int(r) for row in matrix for r in row if not math.isnan(r)})
    mids = [math.sqrt(values[i] * values[i + 1]) for i in range(len(values) - 1)]  # colour boundaries
    bounds = [values[0] / 1.5, *mids, values[-1] * 1.5]
    cmap = ListedColormap(plt.get_cmap("viridis")([i / max(1, len(values) - 1) for i in range(len(values))]))
    fig, ax = plt.subplots(figsize=(max(8.0, 0.55 * n_layers + 3), max(4.5, 0.6 * len(modules) + 2)))
    image = ax.imshow(matrix, cmap=cmap, norm=BoundaryNorm(bounds, cmap.N), aspect="auto")
    for i, row in enumerate(matrix):
        for j, r in enumerate(row):
            if not math.isnan(r):
                dark = values.index(int(r)) < len(values) / 2  # viridis: low ranks are dark cells
                ax.text(j, i, str(int(r)), ha="center", va="center", fontsize=8, color="white" if dark else "black")
    bar = fig.colorbar(image, ax=ax, ticks=values)
    bar.set_label("LoRA rank r (legend)")
    ax.set_xticks(range(n_layers))
    ax.set_yticks(range(len(modules)), modules)
    ax.set_xlabel("layer (block index)")
    ax.set_ylabel("target module")
    counts = " ".join(f"{v}:{sum(1 for row in matrix for r in row if r == v)}" for v in values)
    ax.set_title(f"LoRA rank per module and layer at the switch (rank:count {counts})")
    return save(fig, path)


def plot_lora_norms(run: RunData, path: Path) -> Path:
    """(d) left: mean base / LoRA / effective norm over steps; right: per layer at the last sample."""
    series = need(run, "lora_norm/")
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(FIGSIZE[0] + 3, FIGSIZE[1]), gridspec_kw={"width_ratios": [1, 1.4]}
    )
    for kind, color in KIND_COLORS.items():
        s = series.get(f"lora_norm/{kind}/mean")
        if s:
            left.plot(*xy(s), color=color, linestyle=KIND_STYLES[kind], marker=".", label=f"{kind} (mean over layers)")
    mark_phases(left, run)
    left.set_yscale("log")
    left.set_title("Mean norm over target layers after the switch")
    left.set_xlabel("optimizer step")
    left.set_ylabel("Frobenius norm (log scale)")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    logged = {tag.split("/", 2)[2] for tag in series if not tag.endswith("/mean")}
    names = [n for group in layer_groups(run, sorted(logged)).values() for n in group if n in logged]
    for kind, color in KIND_COLORS.items():
        last = [
            series[f"lora_norm/{kind}/{n}"][-1][1] if f"lora_norm/{kind}/{n}" in series else float("nan") for n in names
        ]
        right.plot(
            range(len(names)),
            last,
            color=color,
            marker="o",
            markersize=4,
            linestyle=KIND_STYLES[kind],
            linewidth=0.8,
            label=kind,
        )
    step = max(s[-1][0] for s in series.values())
    right.set_yscale("log")
    right.set_xticks(range(len(names)), names if len(names) <= 48 else [""] * len(names), rotation=90, fontsize=7)
    right.set_title(f"Per layer at step {step}: ||W0||, ||s B A||, ||W0 + s B A||")
    right.set_xlabel("target layer (grouped by module)")
    right.set_ylabel("Frobenius norm (log scale)")
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    return save(fig, path)


def plot_throughput(run: RunData, path: Path) -> Path:
    """(e) step time and images/s with the phases shaded; median step time per phase (summary.json)."""
    step_s = need(run, "train/step_s")["train/step_s"]
    imgs = run.scalars.get("train/images_per_s", [])
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(FIGSIZE[0] + 4, FIGSIZE[1]), gridspec_kw={"width_ratios": [2, 2, 1]})
    a.plot(*xy(step_s), color="black", linewidth=0.9, label="step time")
    a.set_title("Step time")
    a.set_ylabel("seconds per optimizer step")
    b.plot(*xy(imgs), color="black", linewidth=0.9, label="images/s")
    b.set_title("Throughput")
    b.set_ylabel("images / s (global batch / step time)")
    for ax in (a, b):
        shade_phases(ax, run)
        full_x_range(ax, run)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    medians = [(p["name"], p["median_step_s"]) for p in phases(run) if p.get("median_step_s") is not None]
    if medians:
        names = [n for n, _ in medians]
        bars = c.bar(
            names,
            [v for _, v in medians],
            color=[PHASE_COLORS.get(n, "grey") for n in names],
            label=[f"{n} (median)" for n in names],
        )
        c.bar_label(bars, fmt="%.3f s", fontsize=8)
        c.set_ylim(0, 1.3 * max(v for _, v in medians))
        c.legend(fontsize=8, loc="upper left")
    else:
        c.text(0.5, 0.5, "no summary.json", ha="center", transform=c.transAxes)
    c.set_title("Median step time per phase")
    c.set_xlabel("phase")
    c.set_ylabel("seconds per optimizer step")
    return save(fig, path)


def plot_loss_top1(run: RunData, path: Path) -> Path:
    """(f) the training loss (top) and val top-1 (bottom) over steps, phase starts marked."""
    loss = need(run, tag("loss"))[tag("loss")]
    top1 = run.scalars.get(tag("val_top1")) or [(v["step"], v["top1"]) for v in (run.summary or {}).get("val", [])]
    fig, (a, b) = plt.subplots(2, 1, figsize=(FIGSIZE[0], FIGSIZE[1] + 1.5), sharex=True)
    a.plot(*xy(loss), color="black", linewidth=0.9, label="train loss (mean over ranks)")
    a.set_title("Training loss and validation top-1")
    a.set_ylabel("cross-entropy loss (nats)")
    if top1:
        b.plot(*xy(top1), color="tab:red", marker="o", label="val top-1")
    b.set_ylabel("val top-1 accuracy (%)")
    b.set_xlabel("optimizer step")
    for ax in (a, b):
        mark_phases(ax, run)
        full_x_range(ax, run)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save(fig, path)


FIGURES: dict[str, Callable[[RunData, Path], Path]] = {
    "weight_norms.png": plot_weight_norms,
    "layer_changes.png": plot_layer_changes,
    "ranks.png": plot_ranks,
    "lora_norms.png": plot_lora_norms,
    "throughput.png": plot_throughput,
    "loss_top1.png": plot_loss_top1,
}


def plot_run(run_dir: Path, out_dir: Path | None = None) -> list[Path]:
    """Write every figure whose data exists; returns the paths written (notes for the others on stdout)."""
    run = load_run(run_dir)
    if not run.summary:
        print(f"note: no summary.json in {run_dir} (run not finished?): phases are not marked")
    out_dir = out_dir or run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fn in FIGURES.items():
        try:
            written.append(fn(run, out_dir / name))
        except Skip as exc:
            plt.close("all")
            print(f"skipped {name}: {exc}")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="prelora plot", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path, help="a run directory (holds tb/, summary.json, windows.json)")
    parser.add_argument("--out_dir", type=Path, default=None, help="where to write the PNGs (default RUN_DIR/plots)")
    args = parser.parse_args(argv)
    if not args.run_dir.is_dir():
        parser.error(f"{args.run_dir} is not a directory")
    written = plot_run(args.run_dir, args.out_dir)
    print(f"wrote {len(written)} figure(s):")
    for path in written:
        print(f"  {path}")
    return 0
