"""The training loop's state: where the run is (step, epoch, position in the epoch), which phases it went
through and what it measured. Saved in every checkpoint (`trainer_state.json`'s "loop"), so a resume continues
exactly. This object is the one owner of the phase and the per-layer ranks: the engine is built from them, the
policy reads them, summary.json reports them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass  # changed in place by `regroup` only: the Checkpointer reads the Trainer's object
class BatchGeometry:
    """How a global batch is made on this world: micro batch x accumulation x ranks. The global batch is fixed for
    a run; a phase may change the micro batch (engine.<phase>.micro_batch), which changes the accumulation."""

    micro: int  # images per rank per forward
    accum: int  # micro batches per optimizer step
    world: int
    steps_per_epoch: int

    @property
    def global_batch(self) -> int:
        return self.micro * self.accum * self.world

    def regroup(self, micro: int, batch_in_epoch: int) -> int:
        """Take `micro` images a forward from now on (the accumulation follows); returns `batch_in_epoch`, a count of
        micro batches of the old size, in the new size (a whole number: steps consumed whole global batches)."""
        images = batch_in_epoch * self.micro
        self.accum, self.micro = self.micro * self.accum // micro, micro
        return images // micro


@dataclass
class PhaseRecord:
    """One phase of the run, as summary.json lists it."""

    name: str
    start_step: int
    start_epoch: int  # epochs done when the phase started
    end_step: int | None = None  # None while the phase runs
    trainable_params: int | None = None
    total_params: int | None = None
    switch_s: float | None = None  # the rebuild that started the phase
    peak_memory_bytes: int | None = None


@dataclass
class LoopState:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # micro batches of the current epoch already consumed
    ranks: dict[str, int] = field(default_factory=dict)  # full layer name -> LoRA rank (empty before any LoRA)
    switch_step: int | None = None
    switch_epoch: int | None = None
    history: list[PhaseRecord] = field(default_factory=list)
    step_times: dict[str, list[float]] = field(default_factory=dict)
    checks: list[dict[str, Any]] = field(default_factory=list)  # one record per closed window (windows.json)
    val: list[dict[str, float]] = field(default_factory=list)
    wall_s: float = 0.0
    relora_merges: int = 0
    merge_s: list[float] = field(default_factory=list)
    skipped_steps: int = 0  # steps DeepSpeed skipped for a non-finite loss or gradient
    bad_streak: int = 0  # of them, how many in a row up to the current step

    @property
    def phase(self) -> str:
        """The phase running now: the last one the history started."""
        return self.history[-1].name if self.history else "full"

    @property
    def current(self) -> PhaseRecord:
        return self.history[-1]

    def start_phase(self, name: str, ranks: dict[str, int] | None, start_epoch: int) -> None:
        """Phase `name` starts at the current step (`ranks`: new per-layer ranks; None keeps the current ones)."""
        if self.history:
            self.history[-1].end_step = self.step
        if ranks is not None:
            self.ranks = dict(ranks)
        self.history.append(PhaseRecord(name, self.step, start_epoch))

    def relora_start(self) -> int | None:
        """The step `relora` began (None: it has not)."""
        return next((h.start_step for h in self.history if h.name == "relora"), None)

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint's form; `phase` is written for readers of the file, never read back."""
        return dataclasses.asdict(self) | {"phase": self.phase}

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> LoopState:
        """From a checkpoint (also one written before the phase record was typed: its keys may be missing)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        state = cls(**{k: v for k, v in saved.items() if k in fields and k != "history"})
        names = {f.name for f in dataclasses.fields(PhaseRecord)}
        state.history = [PhaseRecord(**{k: v for k, v in h.items() if k in names}) for h in saved.get("history", [])]
        return state
