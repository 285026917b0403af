"""Validation: exact top-1 / top-5 / loss over the whole val set, counts kept on the device and all-reduced once."""

from __future__ import annotations

import torch

from prelora_ds.distributed import collectives


class TopKCounts:
    """Correct-at-1, correct-at-5, images and loss sum over this rank's share of the val set.

    The counts stay on the device while batches are added (no host sync per batch); `reduce` reads them
    once and sums them over ranks through the package's statistics group.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.counts = torch.zeros(4, dtype=torch.float64, device=device)

    def add(self, logits: torch.Tensor, targets: torch.Tensor, loss_fn: torch.nn.Module) -> None:
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top == targets[:, None]
        n = targets.shape[0]
        self.counts += torch.stack(
            [hit[:, 0].sum(), hit.any(dim=1).sum(), torch.tensor(n, device=logits.device), loss_fn(logits, targets) * n]
        ).to(torch.float64)

    def reduce(self) -> dict[str, float]:
        """{top1, top5 (percent), loss (mean)} over every rank's images (a collective: every rank calls it)."""
        c1, c5, n, loss = collectives.all_reduce_sum(self.counts.tolist())
        if n == 0:
            raise ValueError("the validation set is empty: nothing to evaluate")
        return {"top1": 100 * c1 / n, "top5": 100 * c5 / n, "loss": loss / n}


@torch.no_grad()
def count_val_set(engine, loader, dtype: torch.dtype, loss_fn: torch.nn.Module) -> TopKCounts:
    """This rank's counts over its share of the val set (no padded duplicates), the engine in eval mode meanwhile."""
    engine.eval()
    counts = TopKCounts(engine.device)
    for images, targets in loader:
        images = images.to(engine.device, non_blocking=True)
        targets = targets.to(engine.device, non_blocking=True)
        counts.add(engine(images.to(dtype)).float(), targets, loss_fn)
    engine.train()
    return counts
