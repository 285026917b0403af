"""Reading a run directory back: TensorBoard scalars and layout, and the run files (summary.json, windows.json,
ranks.json). The one reader that the `prelora` sub-commands, the GPU check and the tests use.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prelora_ds.metrics.tags import current_name

Series = list[tuple[int, float]]


def event_files(run_dir: Path, phase: str | None = None) -> list[Path]:
    """Every event file under run_dir/tb (tb/ itself and the phases' tb/<phase>/; only tb/<phase>/ when `phase` is
    given), oldest first: by the time in the name TensorBoard gives it (`events.out.tfevents.<seconds>.<host>...`),
    so a resume's files come last."""

    def written(path: Path) -> tuple[float, str]:
        try:
            return float(path.name.split(".")[3]), str(path)
        except (IndexError, ValueError):
            return 0.0, str(path)

    folder = run_dir / "tb" if phase is None else run_dir / "tb" / phase
    return sorted(folder.rglob("events.*") if phase is None else folder.glob("events.*"), key=written)


def _accumulators(run_dir: Path, kind: str, phase: str | None = None):
    """An EventAccumulator per event file under run_dir/tb, oldest first (a resume adds files)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for path in event_files(run_dir, phase):
        acc = EventAccumulator(str(path), size_guidance={kind: 0})
        acc.Reload()
        yield acc


def scalars(run_dir: Path, prefix: str = "", phase: str | None = None) -> dict[str, Series]:
    """tag -> [(step, value)] sorted by step, merged over every event file and phase (a later file wins a step);
    one phase's TensorBoard run only when `phase` is given."""
    merged: dict[str, dict[int, float]] = {}
    for acc in _accumulators(run_dir, "scalars", phase):
        for tag in acc.Tags()["scalars"]:
            if current_name(tag).startswith(prefix):
                series = merged.setdefault(current_name(tag), {})  # an older run's tags under today's names
                for event in acc.Scalars(tag):
                    series[event.step] = event.value
    return {tag: sorted(series.items()) for tag, series in merged.items()}


def scalar_events(run_dir: Path, tag: str) -> list[int]:
    """The step of every event of `tag`, over every event file, repeats kept (a step written twice shows twice)."""
    accs = [acc for acc in _accumulators(run_dir, "scalars") if tag in acc.Tags()["scalars"]]
    return [event.step for acc in accs for event in acc.Scalars(tag)]


def custom_scalars_charts(run_dir: Path) -> dict[str, list[str]]:
    """The custom-scalars layout the run wrote: chart title -> its tag regexes."""
    from tensorboard.plugins.custom_scalar import layout_pb2

    for acc in _accumulators(run_dir, "tensors"):
        if "custom_scalars__config__" in acc.Tags()["tensors"]:
            layout = layout_pb2.Layout()
            layout.ParseFromString(acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
            return {chart.title: list(chart.multiline.tag) for cat in layout.category for chart in cat.chart}
    return {}


def read_json(path: Path) -> Any:
    """A run file's content; None when the file is not there (a run that never switched has no ranks.json)."""
    return json.loads(path.read_text()) if path.is_file() else None


@dataclass
class RunData:
    run_dir: Path
    scalars: dict[str, Series]
    summary: dict | None
    windows: dict | None
    ranks: dict | None


def load_run(run_dir: Path) -> RunData:
    """Everything a finished (or stopped) run wrote that the tools read."""
    return RunData(
        run_dir=run_dir,
        scalars=scalars(run_dir) if (run_dir / "tb").is_dir() else {},
        summary=read_json(run_dir / "summary.json"),
        windows=read_json(run_dir / "windows.json"),
        ranks=read_json(run_dir / "ranks.json"),
    )
