"""What a run shows: TensorBoard scalars (every tag name in `TAGS`), a custom-scalars layout that groups the
per-layer series into one chart per module type, the progress display, and the run files (summary.json,
windows.json, ranks.json).

TensorBoard, laid out for a person (docs/usage.md, TensorBoard):
- the headline groups sort first (TensorBoard orders groups by name, digits before letters): `1_train` (loss, LR,
  phase, trainable parameters), `2_val`, `3_prelora_test` (the window changes against their thresholds),
  `4_weight_norm` (per module, the effective weight W + s B A after the switch); per-layer and system detail below;
- every scalar goes to the event files of the phase its step belongs to, `tb/<phase>/`: TensorBoard draws each
  phase as a run of its own colour, so the switch shows in every chart, and its smoothing never blends two phases
  (a quantity constant within a phase, such as the trainable parameters, reads exactly);
- the window statistics have one point per window: the layout's titles say to read them with smoothing 0;
- the custom-scalars layout and the switch texts are in `tb/` itself.

Rank 0 writes; on other ranks every method is a no-op, so call sites need no rank checks.
"""

from __future__ import annotations

import json
import math
import re
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from prelora_ds.distributed import preempt
from prelora_ds.log import logger
from prelora_ds.lora.inject import PHASES, layer_index, module_key
from prelora_ds.metrics.progress import open_progress
from prelora_ds.metrics.tags import LORA_KINDS, series, tag


def custom_scalars_layout(modules: dict[str, list[str]]) -> dict[str, dict[str, list]]:
    """TensorBoard's custom-scalars layout: `modules` maps a module type (e.g. 'attn.qkv') to its layer names."""
    chart = lambda *regexes: ["Multiline", list(regexes)]  # noqa: E731
    exact = "one point per window: read with Smoothing 0"
    layout: dict[str, dict[str, list]] = {
        "Training (a colour per phase: the switch is where it changes)": {
            "train loss": chart(series("loss")),
            "learning rate": chart(series("lr")),
            "val top-1 (%), one point per epoch": chart(series("val_top1")),
            "trainable parameters": chart(series("trainable")),
        },
        "PreLoRA test: the switch comes when every change stays under its threshold": {
            f"window change of the loss dL (%) and delta_l ({exact})": chart(series("dL"), series("delta_l")),
            f"window change per module D (%) and delta_w ({exact})": chart(series("D"), series("delta_w")),
            "weight norm per module, mean over layers (W + s B A after the switch)": chart(series("norm")),
        },
        "Weight norms per layer (W + s B A after the switch)": {
            f"{m}: norm per layer": chart(series("norm_layer", module=m)) for m in modules
        },
    }
    for kind in LORA_KINDS:
        layout[f"LoRA {kind} norms per layer (after the switch)"] = {
            f"{m}: ||{kind}|| per layer": chart(*(f"^{re.escape(tag('lora_norm', kind=kind, layer=n))}$"
                                                  for n in names))
            for m, names in modules.items()
        }
    layout["Ranks"] = {"rank per layer (x axis: the layer index, not a step)": chart(series("rank"))}
    return layout


# ----------------------------------------------------------------- peak memory per phase
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def memory_bytes() -> int:
    """Peak accelerator memory on GPU, else the process's peak RSS, since the last `reset_peak_memory`."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    try:  # Linux: VmHWM, the peak RSS that `reset_peak_memory` can reset
        return int(re.search(r"VmHWM:\s+(\d+) kB", _STATUS.read_text())[1]) * 1024
    except (OSError, TypeError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # never reset
        return int(peak if sys.platform == "darwin" else peak * 1024)


def reset_peak_memory() -> None:
    """Start a new peak (at a phase change, so each phase reports its own)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        _CLEAR_REFS.write_text("5")  # Linux: resets VmHWM to the current RSS
    except OSError:
        pass  # elsewhere the peak covers the whole process


class Display:
    """Writes on rank 0 only (`enabled`), so call sites need no rank checks; `Display.off()` writes nothing.

    `writer` (tb/) holds the layout and the texts; scalars and histograms go to `tb/<phase>/`, one writer per phase
    opened on first use."""

    def __init__(self, out_dir: Path | None, enabled: bool, total_steps: int = 0, start_step: int = 0) -> None:
        self.enabled = enabled
        self.writer = None
        self.phase_writers: dict[str, Any] = {}
        self.bar = None
        if self.enabled:
            self.writer = self._open(out_dir / "tb")
            self.bar = open_progress(total_steps, start_step)

    @staticmethod
    def _open(log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(log_dir))

    @classmethod
    def off(cls) -> Display:
        return cls(None, False)

    def _phase_writer(self, phase: str):
        if phase not in self.phase_writers:
            self.phase_writers[phase] = self._open(Path(self.writer.log_dir) / phase)
        return self.phase_writers[phase]

    def scalars(self, phase: str, step: int, values: dict[str, float]) -> None:
        if self.writer:
            writer = self._phase_writer(phase)
            for key, value in values.items():
                writer.add_scalar(key, value, step)

    def histogram(self, phase: str, tag: str, values, step: int) -> None:
        if self.writer:
            self._phase_writer(phase).add_histogram(tag, torch.as_tensor(values, dtype=torch.float32), step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.writer:
            self.writer.add_text(tag, text, step)

    def progress(self, step: int, **postfix: float | str) -> None:
        if self.bar:
            self.bar.update(step, postfix)

    def close(self) -> None:
        if self.bar:
            self.bar.close()
            self.bar = None
        for writer in [self.writer, *self.phase_writers.values()] if self.writer else []:
            writer.flush()
            writer.close()


class Recorder:
    """Silent until `start` (so engines built and switched outside a run, e.g. by benchmarks, write nothing)."""

    def __init__(self, out_dir: Path, rank: int) -> None:
        self.out_dir, self.rank = out_dir, rank
        self.display = Display.off()
        self.phase = "full"  # whose TensorBoard run the scalars go to: the phase of the step they belong to
        self.trainable: int | None = None  # the phase's count, logged with every step (a flat line per phase)

    def start(self, total_steps: int, start_step: int, modules: dict[str, list[str]], phase: str) -> None:
        """Open TensorBoard and the progress display (rank 0) and write the custom-scalars layout."""
        self.display = Display(self.out_dir, self.rank == 0, total_steps, start_step)
        self.phase = phase
        if self.display.writer:
            self.display.writer.add_custom_scalars(custom_scalars_layout(modules))

    # ----------------------------------------------------------------- TensorBoard
    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.display.scalars(self.phase, step, values)

    def train_step(self, step: int, phase: str, loss: float, lr: float, dt: float, images: int, grad_norm) -> None:
        values = {
            tag("loss"): loss, tag("lr"): lr, tag("images_per_s"): images / dt, tag("step_s"): dt,
            tag("memory"): memory_bytes(), tag("phase_index"): list(PHASES).index(phase),
        }  # fmt: skip
        if self.trainable is not None:
            values[tag("trainable")] = self.trainable
        if grad_norm is not None and math.isfinite(float(grad_norm)):
            values[tag("grad_norm")] = float(grad_norm)
        self.phase = phase
        self.scalars(step, values)
        self.display.progress(step, loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{images / dt:.0f}", phase=phase)

    def progress(self, step: int) -> None:
        self.display.progress(step)

    def params(self, step: int, phase: str, trainable: int, total: int) -> None:
        self.phase, self.trainable = phase, trainable
        self.scalars(step, {tag("trainable"): trainable, tag("total"): total})
        share = 100 * trainable / total
        logger.info(f"[{phase}] step {step}: {trainable:,} of {total:,} parameters trainable ({share:.1f}%)")

    def phase_change(self, step: int, name: str, elapsed: float) -> None:
        self.phase = name
        self.display.text("phase", f"step {step}: -> {name} ({elapsed:.2f} s)", step)
        self.scalars(step, {tag("phase_index"): list(PHASES).index(name), tag("switch_s"): elapsed})

    def norms(self, step: int, sampled: dict[str, list[float]]) -> None:
        values = {}
        for m, vals in sampled.items():
            values[tag("norm", module=m)] = sum(vals) / len(vals)
            values.update({tag("norm_layer", module=m, layer=i): v for i, v in enumerate(vals)})
        self.scalars(step, values)

    def window(self, step: int, dL: float, D: dict[str, float], delta_l: float, delta_w: float) -> None:
        self.scalars(
            step,
            {tag("dL"): dL, tag("delta_l"): delta_l, tag("delta_w"): delta_w}
            | {tag("D", module=m): v for m, v in D.items()},
        )

    def lora_norms(self, step: int, values: dict[str, dict[str, float]]) -> None:
        out = {}
        for layer, v in values.items():
            out.update({tag("lora_norm", kind=kind, layer=layer): x for kind, x in v.items()})
        for kind in LORA_KINDS:
            out[tag("lora_norm_mean", kind=kind)] = sum(v[kind] for v in values.values()) / len(values)
        self.scalars(step, out)

    def switch(self, step: int, epoch: int, ranks: dict[str, int], changes, reason: str, elapsed: float) -> None:
        self.write_json("ranks.json", ranks)
        self.display.histogram(self.phase, tag("rank_histogram"), list(ranks.values()), step)
        for module, by_layer in ranks_by_module(ranks).items():  # a line over the layers: x is the layer index
            for layer, r in by_layer.items():
                self.display.scalars(self.phase, layer, {tag("rank", module=module): r})
        self.display.text(
            "switch", f"switch at step {step} (epoch {epoch}, {reason}), {elapsed:.2f} s; layer changes "
            f"{json.dumps(changes)}", step,
        )  # fmt: skip
        logger.info(
            f"PreLoRA switch at step {step} ({reason}): ranks {sorted(set(ranks.values()))} written to ranks.json"
        )

    def val(self, step: int, epoch: int, phase: str, result: dict[str, float]) -> None:
        self.phase = phase
        self.scalars(
            step, {tag("val_top1"): result["top1"], tag("val_top5"): result["top5"], tag("val_loss"): result["loss"]}
        )
        logger.info(
            f"epoch {epoch} step {step} [{phase}]: val top-1 {result['top1']:.2f}% top-5 {result['top5']:.2f}% "
            f"loss {result['loss']:.4f}"
        )

    def merge(self, step: int, merges: int, deltas: dict[str, float], pruned: float, elapsed: float) -> None:
        self.scalars(step, {
            tag("merges"): merges, tag("merged_delta_norm"): math.sqrt(sum(d * d for d in deltas.values())),
            tag("pruned_share"): pruned, tag("merge_s"): elapsed,
        })  # fmt: skip

    def skipped(self, step: int, skipped: int, streak: int, limit: int) -> None:
        self.scalars(step, {tag("skipped_steps"): skipped})
        logger.info(
            f"step {step}: non-finite loss or gradient, step skipped by DeepSpeed ({streak} in a row, {skipped} in "
            f"all; the limit is {limit} in a row)"
        )

    def preempted(self, decision, step: int, phase: str, checkpoint: Path) -> None:
        """A signal (or a launcher that went: LAUNCHER_GONE) stopped every rank after `step`, checkpointed: the
        marker file for a scheduler script (the launcher's exit code may say otherwise, or reach nobody) and the
        message."""
        elapsed = time.time() - decision.first_signal_time
        self.scalars(step, {tag("signal_to_saved_s"): elapsed})
        self.write_json(preempt.MARKER, {"signal": decision.signal_name, "step": step, "phase": phase,
                                         "checkpoint": str(checkpoint), "signal_to_saved_s": elapsed,
                                         "exit_code": preempt.EXIT_CODE})  # fmt: skip
        budget = "within" if elapsed < preempt.LAUNCHER_GRACE_S else "NOT within"
        from prelora_ds.distributed import elastic

        # torchrun's agent stops its workers the same way (SIGTERM, SIGKILL 30 s later) when a node joins or leaves,
        # and starts them again with the same command: nothing to do by hand there
        if elastic.under_agent():
            launcher = "torchrun's"
            then = ("a torchrun agent that stopped its workers for a node change starts them again and they resume "
                    "here; else run the same command")
        else:
            launcher, then = "the deepspeed launcher's", "continue with the same command and --resume"
        logger.info(
            f"pre-empted by {decision.signal_name}: every rank stopped after step {step} ({phase}); checkpoint "
            f"{checkpoint} complete {elapsed:.1f} s after the first signal ({budget} {launcher} "
            f"{preempt.LAUNCHER_GRACE_S:.0f} s before SIGKILL). Exit code {preempt.EXIT_CODE} (requeue): {then}."
        )

    def peak_memory(self) -> int:
        """This phase's peak so far (the accelerator's allocator on GPU, VmHWM on CPU)."""
        return memory_bytes()

    def start_phase_peak(self) -> None:
        """A new phase measures its own peak (called after a rebuild: its transient peak counts in neither)."""
        reset_peak_memory()

    def close(self) -> None:
        self.display.close()

    # ----------------------------------------------------------------- run files
    def write_json(self, name: str, obj: Any) -> None:
        if self.rank == 0:
            (self.out_dir / name).write_text(json.dumps(obj, indent=1))


def ranks_by_module(ranks: dict[str, int]) -> dict[str, dict[int, int]]:
    """ranks.json's {layer name: rank} as {module key: {layer index: rank}} (`blocks.3.attn.qkv` -> attn.qkv, 3)."""
    out: dict[str, dict[int, int]] = {}
    for name, r in ranks.items():
        out.setdefault(module_key(name), {})[layer_index(name)] = r
    return out


def summary(state, meta: dict[str, Any]) -> dict[str, Any]:
    """summary.json from the loop state (`LoopState`) and the run's constants in `meta`."""
    phases = []
    for h in state.history:
        times = state.step_times.get(h.name, [])
        phases.append({
            "name": h.name, "start_step": h.start_step, "end_step": state.step if h.end_step is None else h.end_step,
            "trainable_params": h.trainable_params, "total_params": h.total_params,
            "median_step_s": statistics.median(times) if times else None, "switch_s": h.switch_s,
            "peak_memory_bytes": h.peak_memory_bytes,
        })  # fmt: skip
    final = state.val[-1] if state.val else {}
    return {
        "phases": phases,
        "switch_step": state.switch_step,
        "relora_merges": state.relora_merges,
        "relora_merge_s": statistics.median(state.merge_s) if state.merge_s else None,
        "switch_epoch": state.switch_epoch,
        "final_val_top1": final.get("top1"),
        "final_val_top5": final.get("top5"),
        "val": state.val,
        "steps": state.step,
        "epochs": state.epoch,
        "wall_time_s": state.wall_s,
        "skipped_steps": state.skipped_steps,
        **meta,
    }


def windows_file(checks: list[dict], layers: dict[str, list[str]], rank_bounds: dict[str, tuple[int, int]], p,
                 accumulator_state: dict) -> dict[str, Any]:
    """windows.json: what `prelora replay` needs to replay the test at other thresholds (`rank_bounds`: each
    module's candidate ranks, after prelora.rank_reference_width)."""
    thresholds = {k: getattr(p, k) for k in ("delta_w", "delta_l", "num_windows", "window_steps", "window_epochs",
                                             "r_min", "r_max", "rank_reference_width", "min_epochs", "max_epochs")}
    thresholds["rank_bounds"] = rank_bounds
    return {"checks": checks, "layers": layers, "thresholds": thresholds, **accumulator_state}
