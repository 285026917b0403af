"""Datasets, transforms, samplers and loaders for ViT training.

Four sources (``DataConfig.dataset``): ``imagefolder`` (ImageNet-style ``train/`` and ``val/`` class folders),
``shards`` (the same packed into tar shards by ``prelora pack-shards``, see ``shards.py``), ``digits``
(scikit-learn's embedded 8x8 handwritten digits: real data, no download) and ``synthetic``
(seeded random tensors, for benchmarks). Images go through timm's ``create_transform`` in DataLoader workers,
or, with ``data.loader: device``, are decoded and augmented on the rank's GPU (``device_input.py``).

Exact resume rests on three pieces: ``SeededDataset`` makes each sample's augmentation a function of
(seed, epoch, index) only, ``ResumableDistributedSampler`` skips the samples a rank already consumed this
epoch, and the train loader owns its ``torch.Generator`` so iterating it never touches the global RNG.
Call ``set_train_epoch(loader, epoch, skip_samples)`` before each ``iter(loader)``.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from timm.loss import SoftTargetCrossEntropy
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from prelora_ds.config.sections import DataConfig
from prelora_ds.data.images import RobustImageFolder, check_imagefolder, check_nonempty, load_image
from prelora_ds.data.samplers import ResumableDistributedSampler, ShardSampler, check_train_size
from prelora_ds.data.shards import ShardDataset, check_shards
from prelora_ds.distributed.preempt import ignore_in_worker
from prelora_ds.errors import ConfigError

__all__ = [
    "DataBundle",
    "DigitsDataset",
    "ResumableDistributedSampler",
    "RobustImageFolder",
    "SeededDataset",
    "ShardSampler",
    "SyntheticDataset",
    "build_datasets",
    "build_loaders",
    "build_mixup",
    "build_train_loss",
    "build_transforms",
    "check_train_size",
    "load_image",
    "set_train_epoch",
]

_U64 = 1 << 64


# --------------------------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------------------------


class DigitsDataset(Dataset):
    """uint8 grayscale images held in memory (scikit-learn digits), converted to `mode` then transformed."""

    def __init__(
        self,
        images: np.ndarray,
        targets: Sequence[int],
        transform: Callable[[Any], Any] | None,
        mode: str = "RGB",
    ) -> None:
        self.images = images
        self.targets = [int(t) for t in targets]
        self.transform = transform
        self.mode = mode

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = Image.fromarray(self.images[index]).convert(self.mode)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]


class SyntheticDataset(Dataset):
    """Seeded random tensors, already "normalized" (N(0, 1)), with seeded random labels.

    Each item is generated from its own (seed, stream, index) generator, so any size costs no memory, items
    are identical across workers and resumes, and no PIL/augmentation work hides the model's throughput.
    """

    def __init__(self, size: int, num_classes: int, shape: tuple[int, int, int], seed: int, stream: int) -> None:
        self.size = size
        self.num_classes = num_classes
        self.shape = shape
        self.seed = seed
        self.stream = stream

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.size:
            raise IndexError(index)
        state = np.random.SeedSequence([self.seed % _U64, self.stream, index]).generate_state(1, dtype=np.uint64)
        g = torch.Generator().manual_seed(int(state[0]))
        x = torch.randn(self.shape, generator=g)
        y = int(torch.randint(self.num_classes, (1,), generator=g))
        return x, y


TRACE_ENV = "PRELORA_TRACE_SAMPLES"  # a folder: each rank appends "epoch index" of every train image it loads


class SeededDataset(Dataset):
    """Runs the wrapped dataset's ``__getitem__`` with python/numpy/torch RNGs seeded from (seed, epoch, index).

    A sample's augmentation then depends only on (seed, epoch, index): not on the worker count, the worker that
    loads it, or the position a run resumed from. The caller's RNG states are restored afterwards, so the
    training loop's own randomness (dropout, mixup) is untouched. Only the CPU torch generator is seeded:
    ``torch.manual_seed`` would also reseed CUDA.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    @property
    def num_skipped(self) -> int:
        return getattr(self.dataset, "num_skipped", 0)

    def __getitem__(self, index: int) -> Any:
        trace = os.environ.get(TRACE_ENV)
        if trace:  # tests of the sharding across nodes: which rank saw which image
            with open(Path(trace) / f"rank{os.environ.get('RANK', '0')}.txt", "a") as f:
                f.write(f"{self.epoch} {index}\n")
        words = np.random.SeedSequence([self.seed % _U64, self.epoch, int(index)]).generate_state(5, dtype=np.uint32)
        py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
        try:
            random.seed(int(words[0]) << 32 | int(words[1]))
            np.random.seed(words[2])
            torch.default_generator.manual_seed(int(words[3]) << 32 | int(words[4]))
            return self.dataset[index]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
            torch.set_rng_state(torch_state)


@dataclass
class DataBundle:
    train: Dataset
    """A ``SeededDataset``: call ``set_epoch`` (or ``set_train_epoch`` on its loader) every epoch."""
    val: Dataset
    num_classes: int
    class_names: list[str]
    loader: str = "torch"
    """'device': train and val are ``DeviceImages`` (encoded bytes), for ``build_loaders``' device path."""

    @property
    def num_skipped(self) -> int:
        """Unreadable files skipped so far in train and val (this rank only)."""
        return sum(int(getattr(ds, "num_skipped", 0)) for ds in (self.train, self.val))


# --------------------------------------------------------------------------------------------------------------------
# Transforms and dataset construction
# --------------------------------------------------------------------------------------------------------------------


def _channel_stats(values: Sequence[float], in_chans: int, name: str) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if len(values) == in_chans:
        return values
    if in_chans == 1:
        return (sum(values) / len(values),)  # an RGB-pretrained model fed grayscale: average the channel stats
    raise ValueError(f"{name} has {len(values)} values but the model takes {in_chans} channels.")


def build_transforms(
    cfg: DataConfig,
    img_size: int,
    in_chans: int = 3,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    """timm (train, val) transforms: RandomResizedCrop + flip + auto-augment, and resize + center crop (`crop_pct`)."""
    mean_c = _channel_stats(mean, in_chans, "mean")
    std_c = _channel_stats(std, in_chans, "std")
    common: dict[str, Any] = dict(
        input_size=(in_chans, img_size, img_size), interpolation="bicubic", mean=mean_c, std=std_c
    )
    train = create_transform(
        is_training=True,
        auto_augment=cfg.auto_augment or None,
        hflip=cfg.hflip,
        vflip=0.0,
        scale=tuple(cfg.scale),
        re_prob=0.0,
        **common,
    )
    val = create_transform(is_training=False, crop_pct=cfg.crop_pct, **common)
    return train, val


def _digits_split(cfg: DataConfig, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 ink levels -> 0..255
    try:
        tr, va = train_test_split(
            np.arange(len(images)), test_size=cfg.val_fraction, stratify=digits.target, random_state=seed % 2**32
        )
    except ValueError as exc:  # e.g. fewer val images than classes
        raise ConfigError(
            f"data.val_fraction={cfg.val_fraction} cannot split the 1797 digits into stratified "
            f"train/val sets ({exc}); use a value like 0.2."
        ) from exc
    tr, va = np.sort(tr), np.sort(va)
    return images[tr], digits.target[tr], images[va], digits.target[va]


@dataclass(frozen=True)
class _Request:
    """What every source's builder is given."""

    cfg: DataConfig
    img_size: int
    in_chans: int
    seed: int
    mean: Sequence[float]
    std: Sequence[float]

    @property
    def mode(self) -> str:
        return "L" if self.in_chans == 1 else "RGB"

    @property
    def root(self) -> Path:
        return Path(self.cfg.root or "").expanduser()

    def transforms(self) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
        return build_transforms(self.cfg, self.img_size, self.in_chans, self.mean, self.std)


def _synthetic(r: _Request) -> DataBundle:
    shape, n_cls = (r.in_chans, r.img_size, r.img_size), r.cfg.synthetic_num_classes
    train = SyntheticDataset(r.cfg.synthetic_train_size, n_cls, shape, r.seed, stream=0)
    val = SyntheticDataset(r.cfg.synthetic_val_size, n_cls, shape, r.seed, stream=1)
    return DataBundle(SeededDataset(train, r.seed), val, n_cls, [str(i) for i in range(n_cls)])


def _digits(r: _Request) -> DataBundle:
    train_tf, val_tf = r.transforms()
    x_tr, y_tr, x_va, y_va = _digits_split(r.cfg, r.seed)
    train = DigitsDataset(x_tr, y_tr.tolist(), train_tf, r.mode)
    val = DigitsDataset(x_va, y_va.tolist(), val_tf, r.mode)
    return DataBundle(SeededDataset(train, r.seed), val, 10, [str(i) for i in range(10)])


# A file source checks its layout (cheap, before transforms or a full file scan) and returns its class names and
# an opener of a split (`transform` None: encoded bytes for the device loader).
OpenSplit = Callable[[str, Any], Dataset]


def _imagefolder(r: _Request) -> tuple[list[str], OpenSplit]:
    class_names = check_imagefolder(r.root)

    def open_split(split: str, transform) -> Dataset:
        dataset = RobustImageFolder(r.root / split, transform, r.mode)
        check_nonempty(dataset, r.root / split)
        return dataset

    return class_names, open_split


def _shards(r: _Request) -> tuple[list[str], OpenSplit]:
    index = check_shards(r.root)  # every shard present at its recorded size
    return index["classes"], lambda split, transform: ShardDataset(r.root, split, transform, r.mode, index)


IN_MEMORY_SOURCES: dict[str, Callable[[_Request], DataBundle]] = {"synthetic": _synthetic, "digits": _digits}
FILE_SOURCES: dict[str, Callable[[_Request], tuple[list[str], OpenSplit]]] = {
    "imagefolder": _imagefolder,
    "shards": _shards,
}


def build_datasets(
    cfg: DataConfig,
    img_size: int,
    in_chans: int = 3,
    seed: int = 0,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> DataBundle:
    """Train (wrapped in ``SeededDataset``) and val datasets yielding ``(float tensor CxHxW, int label)``; one
    builder per `data.dataset` in the tables above."""
    if in_chans not in (1, 3):
        raise ConfigError(f"in_chans={in_chans}: image datasets provide 1 (grayscale) or 3 (RGB) channels.")
    r = _Request(cfg, img_size, in_chans, seed, mean, std)
    if cfg.dataset in IN_MEMORY_SOURCES:
        return IN_MEMORY_SOURCES[cfg.dataset](r)
    if cfg.dataset not in FILE_SOURCES:
        raise ConfigError(f"data.dataset={cfg.dataset!r} is unknown.")  # DataConfig already rejects this
    class_names, open_split = FILE_SOURCES[cfg.dataset](r)
    if cfg.loader == "device":
        return _device_bundle(r, class_names, open_split)
    train_tf, val_tf = r.transforms()
    train = open_split("train", train_tf)
    val = open_split("val", val_tf)
    return DataBundle(SeededDataset(train, seed), val, len(class_names), class_names)


def _device_bundle(r: _Request, class_names: list[str], open_split: OpenSplit) -> DataBundle:
    """`data.loader: device`: the same files or shards, handed over encoded; transforms run on the device."""
    from prelora_ds.data.device_input import DeviceImages, build_device_transforms

    mean_c, std_c = _channel_stats(r.mean, r.in_chans, "mean"), _channel_stats(r.std, r.in_chans, "std")
    train_tf, val_tf = build_device_transforms(r.cfg, r.img_size, r.in_chans, mean_c, std_c)
    train, val = open_split("train", None), open_split("val", None)
    return DataBundle(
        DeviceImages(train, train_tf, mean_c, std_c, r.in_chans, r.seed),
        DeviceImages(val, val_tf, mean_c, std_c, r.in_chans, None),
        len(class_names),
        class_names,
        loader="device",
    )


# --------------------------------------------------------------------------------------------------------------------
# Samplers and loaders
# --------------------------------------------------------------------------------------------------------------------


def build_loaders(
    bundle: DataBundle, micro_batch: int, rank: int, world_size: int, seed: int, num_workers: int
) -> tuple[DataLoader, DataLoader]:
    """(train, val) loaders for this rank. Train: shuffled, padded across ranks, full micro batches only."""
    check_train_size(len(bundle.train), micro_batch, world_size)  # type: ignore[arg-type]
    if bundle.loader == "device":  # same samplers and seeds; decode and augmentation on the rank's device
        from prelora_ds.data.device_input import build_device_loaders

        return build_device_loaders(bundle, micro_batch, rank, world_size, seed, num_workers)
    pin = torch.cuda.is_available()
    train_sampler = ResumableDistributedSampler(
        bundle.train, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=False
    )
    train = DataLoader(
        bundle.train,
        batch_size=micro_batch,
        sampler=train_sampler,
        num_workers=num_workers,
        pin_memory=pin,
        drop_last=True,  # every step sees a full (and, for mixup, even) micro batch on every rank
        generator=torch.Generator().manual_seed(seed + rank),  # worker base seeds never draw from the global RNG
        worker_init_fn=ignore_in_worker,  # a scheduler's SIGTERM to every process must not kill the workers
        persistent_workers=False,  # workers must see each epoch's SeededDataset.set_epoch
    )
    val = DataLoader(
        bundle.val,
        batch_size=micro_batch,
        sampler=ShardSampler(len(bundle.val), rank, world_size),  # type: ignore[arg-type]
        num_workers=num_workers,
        pin_memory=pin,
        drop_last=False,
        generator=torch.Generator().manual_seed(seed + rank),
        worker_init_fn=ignore_in_worker,
        persistent_workers=False,
    )
    return train, val


def set_train_epoch(loader: DataLoader, epoch: int, skip_samples: int = 0) -> None:
    """Point the train loader's sampler and SeededDataset at `epoch`; call before ``iter(loader)``."""
    sampler = loader.sampler
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)
    if isinstance(sampler, ResumableDistributedSampler):
        sampler.skip(skip_samples)
    elif skip_samples:
        raise ValueError("skip_samples needs a ResumableDistributedSampler (use build_loaders).")
    if hasattr(loader.dataset, "set_epoch"):  # SeededDataset, or the device path's DeviceImages
        loader.dataset.set_epoch(epoch)


# --------------------------------------------------------------------------------------------------------------------
# Mixup and loss
# --------------------------------------------------------------------------------------------------------------------


def build_mixup(cfg: DataConfig, num_classes: int, *, micro_batch: int | None = None) -> Mixup | None:
    """timm Mixup/CutMix (label smoothing included), or None when both alphas are 0.

    Mixup draws from the global numpy/python RNGs in the training process: checkpoint those for exact resume.
    """
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    if micro_batch is not None and micro_batch % 2:
        raise ConfigError(
            f"mixup/cutmix need an even micro batch, got {micro_batch}; change "
            "train_micro_batch_size_per_gpu or set data.mixup=0 and data.cutmix=0."
        )
    return Mixup(
        mixup_alpha=cfg.mixup,
        cutmix_alpha=cfg.cutmix,
        label_smoothing=cfg.label_smoothing,
        num_classes=num_classes,
    )


def build_train_loss(cfg: DataConfig, mixup_active: bool) -> torch.nn.Module:
    """Soft-target CE for mixed (already smoothed) targets, else CE with label smoothing on hard labels."""
    if mixup_active:
        return SoftTargetCrossEntropy()
    return torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
