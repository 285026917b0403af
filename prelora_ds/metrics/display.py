"""What rank 0 writes while a run trains: TensorBoard scalars, histograms and text, and the tqdm progress bar."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from prelora_ds.log import set_progress_bar


class Display:
    """Writes on rank 0 only (`enabled`), so call sites need no rank checks; `Monitor.off()` writes nothing."""

    def __init__(self, out_dir: Path | None, enabled: bool, total_steps: int = 0, start_step: int = 0) -> None:
        self.enabled = enabled
        self.writer = None
        self.bar = None
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(out_dir / "tb"))
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, mininterval=2.0)
            set_progress_bar(self.bar)

    @classmethod
    def off(cls) -> Display:
        return cls(None, False)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def histogram(self, tag: str, values, step: int) -> None:
        if self.writer:
            self.writer.add_histogram(tag, torch.as_tensor(values, dtype=torch.float32), step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.writer:
            self.writer.add_text(tag, text, step)

    def progress(self, step: int, **postfix: float | str) -> None:
        if self.bar:
            self.bar.n = step
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(0)

    def close(self) -> None:
        if self.bar:
            set_progress_bar(None)
            self.bar.close()
            self.bar = None
        if self.writer:
            self.writer.flush()
            self.writer.close()
