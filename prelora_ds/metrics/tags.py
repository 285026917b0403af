"""Every TensorBoard tag the package writes, and the regexes over them (no torch import: the `prelora` tools read
runs with these names).

The headline groups sort first in TensorBoard (it orders groups by name, digits before letters); per-layer and
system detail below. Old runs (before the numbered groups) are read through LEGACY_TAGS.
"""

from __future__ import annotations

import re
from typing import Any

# Every TensorBoard tag the package writes; `{...}` fields are filled per module type, layer or phase.
TAGS = {
    "loss": "1_train/loss",
    "lr": "1_train/lr",
    "phase_index": "1_train/phase",  # PHASES' order: 0 full, 1 relora, 2 warmup, 3 lora
    "trainable": "1_train/trainable_params",
    "val_top1": "2_val/top1",
    "val_top5": "2_val/top5",
    "val_loss": "2_val/loss",
    "dL": "3_prelora_test/dL",
    "delta_l": "3_prelora_test/delta_l",
    "D": "3_prelora_test/D/{module}",
    "delta_w": "3_prelora_test/delta_w",
    "norm": "4_weight_norm/{module}",
    "images_per_s": "train/images_per_s",
    "step_s": "train/step_s",
    "memory": "train/memory_bytes",
    "grad_norm": "train/grad_norm",
    "skipped_steps": "train/skipped_steps",
    "switch_s": "phase/switch_s",
    "total": "params/total",
    "norm_layer": "norm_layer/{module}/{layer:02d}",
    "lora_norm": "lora_norm/{kind}/{layer}",
    "lora_norm_mean": "lora_norm/{kind}/mean",
    "rank": "ranks/{module}",  # x: the layer index (blocks.N), not a step
    "rank_histogram": "ranks/histogram",
    "merges": "relora/merges",
    "merged_delta_norm": "relora/merged_delta_norm",
    "pruned_share": "relora/pruned_share",
    "merge_s": "relora/merge_s",
    "save_s": "checkpoint/save_s",
    "signal_to_saved_s": "preempt/signal_to_saved_s",
}
LORA_KINDS = ("base", "lora", "effective")


def tag(name: str, **fields: Any) -> str:
    return TAGS[name].format(**fields)


def series(name: str, **fields: str) -> str:
    """A regex over the tags of `TAGS[name]` with `fields` fixed (escaped) and every other field free."""
    parts = re.split(r"(\{[^}]+\})", TAGS[name])
    out = []
    for part in parts:
        key = part[1:-1].split(":")[0] if part.startswith("{") else None
        out.append(re.escape(fields[key]) if key in fields else r"[^/]+" if key else re.escape(part))
    return "".join(out)




# runs written before the numbered groups: their tags read under today's names (prefix -> prefix)
LEGACY_TAGS = {
    "train/loss": TAGS["loss"], "train/lr": TAGS["lr"], "phase/index": TAGS["phase_index"],
    "params/trainable": TAGS["trainable"], "val/": "2_val/", "window/": "3_prelora_test/", "norm/": "4_weight_norm/",
}  # fmt: skip


def current_name(name: str) -> str:
    """`name` as the package writes it today (a tag of an older run renamed; others unchanged)."""
    for old, new in LEGACY_TAGS.items():
        if name == old or (old.endswith("/") and name.startswith(old)):
            return new + name[len(old):]
    return name
