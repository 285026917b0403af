"""Reading a run directory back: TensorBoard scalars and layout, and the run files (summary.json, windows.json,
ranks.json). The one reader that the `prelora` sub-commands, the GPU check and the tests use.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Series = list[tuple[int, float]]


def _accumulators(run_dir: Path, kind: str):
    """An EventAccumulator per event file under run_dir/tb, oldest first (a resume adds a file)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for path in sorted((run_dir / "tb").glob("events.*")):
        acc = EventAccumulator(str(path), size_guidance={kind: 0})
        acc.Reload()
        yield acc


def scalars(run_dir: Path, prefix: str = "") -> dict[str, Series]:
    """tag -> [(step, value)] sorted by step, merged over every event file (a later file wins a step)."""
    merged: dict[str, dict[int, float]] = {}
    for acc in _accumulators(run_dir, "scalars"):
        for tag in acc.Tags()["scalars"]:
            if tag.startswith(prefix):
                series = merged.setdefault(tag, {})
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
