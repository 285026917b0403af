"""A Trainer on a tiny ViT and synthetic 16 px images, ZeRO-2 (bf16 unless told), for the launched check scripts."""

from __future__ import annotations

import atexit
from pathlib import Path
from typing import Any

import torch

from prelora_ds.config.deepspeed import load_ds_config, prepare_ds_config
from prelora_ds.config.recipe import build_config
from prelora_ds.data.datasets import build_datasets
from prelora_ds.distributed.launch import init_distributed, shutdown_distributed
from prelora_ds.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]


def tiny_trainer(
    out: Path, model_kwargs: dict[str, Any], ds_name: str = "cpu_zero2_bf16.json", ds_changes: dict | None = None,
    resume: bool = False, global_batch: int | None = None, **sections: dict[str, Any]
) -> tuple[Trainer, int, int]:
    """(trainer, rank, world) after starting the process group (once per process); `ds_name` names a
    ds_configs/ file, `ds_changes` replace its top-level keys; `global_batch`: train_batch_size, with the
    accumulation derived (a resume on another world size); `sections` add recipe sections."""
    rank, _, world = init_distributed(600)
    atexit.register(shutdown_distributed)  # a gloo group left to the interpreter's teardown can abort the process
    torch.set_num_threads(1)
    cfg = build_config({
        "data": {"dataset": "synthetic", "synthetic_train_size": 64, "synthetic_val_size": 16,
                 "synthetic_num_classes": 10, "num_workers": 0, "mixup": 0.0, "cutmix": 0.0},
        "model": {"name": "vit_tiny_patch16_224", "kwargs": {"img_size": 16, "patch_size": 4, **model_kwargs}},
        "train": {"epochs": 1, "seed": 0, "lr_warmup_steps": 0},
        **sections,
    })
    ds = load_ds_config(ROOT / "ds_configs" / ds_name) | (ds_changes or {})
    ds["train_micro_batch_size_per_gpu"] = 4
    if global_batch is not None:
        ds.pop("gradient_accumulation_steps", None)
        ds["train_batch_size"] = global_batch
    ds = prepare_ds_config(ds, world)
    data = build_datasets(cfg.data, 16, 3, seed=0)
    return Trainer(cfg, ds, data, out / "run", rank, world, resume=resume), rank, world


def fixed_batch(n: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def fixed_batch_loss(trainer: Trainer, images: torch.Tensor, targets: torch.Tensor) -> float:
    """The model's cross-entropy on a batch, in eval mode (no dropout, no update)."""
    engine = trainer.engine
    engine.eval()
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(engine(images.to(trainer.phases.dtype)).float(), targets)
    engine.train()
    return float(loss)
