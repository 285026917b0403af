"""Datasets, transforms, samplers and loaders for ViT training.

Three sources (``DataConfig.dataset``): ``imagefolder`` (ImageNet-style ``train/`` and ``val/`` class folders),
``digits`` (scikit-learn's embedded 8x8 handwritten digits: real data, no download) and ``synthetic``
(seeded random tensors, for benchmarks). Images go through timm's ``create_transform``.

Exact resume rests on three pieces: ``SeededDataset`` makes each sample's augmentation a function of
(seed, epoch, index) only, ``ResumableDistributedSampler`` skips the samples a rank already consumed this
epoch, and the train loader owns its ``torch.Generator`` so iterating it never touches the global RNG.
Call ``set_train_epoch(loader, epoch, skip_samples)`` before each ``iter(loader)``.
"""

from __future__ import annotations

import functools
import itertools
import multiprocessing as mp
import os
import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from timm.loss import SoftTargetCrossEntropy
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes

from .config import ConfigError, DataConfig
from .preempt import ignore_in_worker

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
    "load_image",
    "set_train_epoch",
]

_U64 = 1 << 64


# --------------------------------------------------------------------------------------------------------------------
# Image decoding
# --------------------------------------------------------------------------------------------------------------------


def _high_bit_depth_to_l(img: Image.Image) -> Image.Image:
    """16-bit / int32 / float images to 8-bit 'L' by scaling; PIL's own convert() clips everything above 255."""
    arr = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        scale = 255.0 if arr.size and np.nanmax(arr) <= 1.0 else 1.0  # [0, 1] floats vs. already 0..255
    elif img.mode.startswith("I;16") or (arr.size and arr.max() > 255):
        scale = 255.0 / 65535.0 if not arr.size or arr.max() <= 65535 else 255.0 / arr.max()
    else:
        scale = 1.0
    arr = np.nan_to_num(arr * scale, nan=0.0)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


def load_image(path: str | Path, mode: str = "RGB") -> Image.Image:
    """Decode `path` fully and convert it to `mode` ('RGB' or 'L'), whatever its own mode or size.

    Decoding happens here (``img.load()``), not lazily in the transform, so truncated or corrupt files raise
    inside the caller's guard. Alpha is dropped as torchvision's ``pil_loader`` does, so pretrained models see
    the colours they were trained on.
    """
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()
    if img.mode == mode:
        return img
    if img.mode.startswith("I") or img.mode == "F":
        img = _high_bit_depth_to_l(img)
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL warns when converting palette+transparency straight to RGB
    return img.convert(mode)


# --------------------------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------------------------


class RobustImageFolder(ImageFolder):
    """torchvision ``ImageFolder`` that skips unreadable files instead of crashing the run.

    A file that fails to decode is replaced, deterministically, by the next readable index (wrapping around),
    warned about once (``warnings.warn`` naming the path) and counted. The "known bad" flags live in a
    lock-free ``multiprocessing.Array`` created here, i.e. in shared memory inherited (fork) or passed at start-up
    (spawn/forkserver) by every DataLoader worker: so ``num_skipped``, read in the main process, counts files
    skipped in any worker, each file once, across epochs and the short-lived (non-persistent) workers of each
    epoch. Without a lock (a SemLock would tie the dataset to one start method) two workers that hit the same bad
    file at the same instant may both warn; the count stays exact because setting a flag is idempotent. The count
    is per rank (each rank owns its dataset); all-reduce it for a global number.
    """

    def __init__(self, root: str | Path, transform: Callable[[Any], Any] | None = None, mode: str = "RGB") -> None:
        loader = functools.partial(load_image, mode=mode)
        super().__init__(str(root), transform=transform, loader=loader, allow_empty=True)
        self.mode = mode
        self._bad = mp.Array("b", max(len(self.samples), 1), lock=False)  # shared int8 flags, one per sample

    @property
    def num_skipped(self) -> int:
        """Files found unreadable so far, by this process or any of its DataLoader workers."""
        return int(np.count_nonzero(np.frombuffer(self._bad, dtype=np.int8)[: len(self.samples)]))

    @property
    def skipped_paths(self) -> list[str]:
        flags = np.frombuffer(self._bad, dtype=np.int8)[: len(self.samples)]
        return [self.samples[i][0] for i in np.flatnonzero(flags)]

    def _mark_bad(self, index: int, path: str, exc: BaseException) -> None:
        first = not self._bad[index]
        self._bad[index] = 1
        if first:
            warnings.warn(f"skipping unreadable image {path}: {type(exc).__name__}: {exc}", UserWarning, stacklevel=3)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        n = len(self.samples)
        flags = self._bad
        for k in range(n):
            j = (index + k) % n
            if flags[j]:
                continue
            path, target = self.samples[j]
            try:
                img = self.loader(path)
            except Exception as exc:  # any decoder failure (OSError, SyntaxError, DecompressionBomb...) = bad file
                self._mark_bad(j, path, exc)
                continue
            # Transform errors are bugs, not bad files: they are deliberately not caught.
            if self.transform is not None:
                img = self.transform(img)
            if self.target_transform is not None:
                target = self.target_transform(target)
            return img, target
        raise RuntimeError(f"none of the {n} images under {self.root} can be read; check the dataset files.")


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


def _check_imagefolder(root: Path) -> list[str]:
    """Raise ConfigError for every layout problem that ImageFolder would report badly or not at all."""
    if not root.is_dir():
        raise ConfigError(
            f"data.root={str(root)!r} does not exist or is not a folder; point --data.root at a "
            "folder holding train/ and val/."
        )
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise ConfigError(
                f"data.root={str(root)!r} has no {split}/ folder; it needs train/ and val/, each "
                "with one sub-folder of images per class."
            )
    classes = {}
    for split in ("train", "val"):
        try:
            classes[split], _ = find_classes(str(root / split))
        except FileNotFoundError:
            classes[split] = []
        if not classes[split]:
            raise ConfigError(
                f"{root / split} has no class folders; put each class's images in its own "
                f"sub-folder ({split}/<class_name>/*.jpg)."
            )
    if classes["train"] != classes["val"]:
        train_set, val_set = set(classes["train"]), set(classes["val"])

        def _few(names: set[str]) -> str:
            ordered = sorted(names)
            return ", ".join(ordered[:5]) + (f" (+{len(ordered) - 5} more)" if len(ordered) > 5 else "") or "none"

        raise ConfigError(
            f"val/ classes differ from train/ classes under {root}: missing from val/: {_few(train_set - val_set)}; "
            f"only in val/: {_few(val_set - train_set)}. Both splits need the same class folders (ImageNet's val "
            "images must be sorted into class folders first)."
        )
    return classes["train"]


def _check_nonempty(ds: ImageFolder, split_dir: Path) -> None:
    counts = np.bincount(np.asarray(ds.targets, dtype=np.int64), minlength=len(ds.classes))
    empty = [ds.classes[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        shown = ", ".join(empty[:5]) + (f" (+{len(empty) - 5} more)" if len(empty) > 5 else "")
        raise ConfigError(
            f"class folder(s) {shown} under {split_dir} hold no images (extensions: "
            f"{' '.join(IMG_EXTENSIONS)}); add images or remove the folder(s)."
        )


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


def build_datasets(
    cfg: DataConfig,
    img_size: int,
    in_chans: int = 3,
    seed: int = 0,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> DataBundle:
    """Train (wrapped in ``SeededDataset``) and val datasets yielding ``(float tensor CxHxW, int label)``."""
    if in_chans not in (1, 3):
        raise ConfigError(f"in_chans={in_chans}: image datasets provide 1 (grayscale) or 3 (RGB) channels.")
    mode = "L" if in_chans == 1 else "RGB"
    root = Path(cfg.root or "").expanduser()
    if cfg.dataset == "synthetic":
        shape = (in_chans, img_size, img_size)
        n_cls = cfg.synthetic_num_classes
        train: Dataset = SyntheticDataset(cfg.synthetic_train_size, n_cls, shape, seed, stream=0)
        val: Dataset = SyntheticDataset(cfg.synthetic_val_size, n_cls, shape, seed, stream=1)
        return DataBundle(SeededDataset(train, seed), val, n_cls, [str(i) for i in range(n_cls)])

    if cfg.dataset == "imagefolder":
        class_names = _check_imagefolder(root)  # cheap layout checks before transforms or a full file scan
    train_tf, val_tf = build_transforms(cfg, img_size, in_chans, mean, std)

    if cfg.dataset == "digits":
        x_tr, y_tr, x_va, y_va = _digits_split(cfg, seed)
        train = DigitsDataset(x_tr, y_tr.tolist(), train_tf, mode)
        val = DigitsDataset(x_va, y_va.tolist(), val_tf, mode)
        return DataBundle(SeededDataset(train, seed), val, 10, [str(i) for i in range(10)])

    if cfg.dataset == "imagefolder":
        train_if = RobustImageFolder(root / "train", train_tf, mode)
        _check_nonempty(train_if, root / "train")
        val_if = RobustImageFolder(root / "val", val_tf, mode)
        _check_nonempty(val_if, root / "val")
        return DataBundle(SeededDataset(train_if, seed), val_if, len(class_names), class_names)

    raise ConfigError(f"data.dataset={cfg.dataset!r} is unknown.")  # DataConfig already rejects this


# --------------------------------------------------------------------------------------------------------------------
# Samplers and loaders
# --------------------------------------------------------------------------------------------------------------------


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` that can skip the first `n` samples of this rank's list, for this epoch only.

    Resume mid-epoch with ``set_epoch(e)`` then ``skip(batches_done * micro_batch)``: the order is the same
    permutation as without the skip (seed + epoch), minus its head. ``set_epoch`` resets the skip.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.start_index = 0

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.start_index = 0

    def skip(self, n: int) -> None:
        if not 0 <= n <= self.num_samples:
            raise ValueError(f"cannot skip {n} samples: this rank has {self.num_samples} per epoch.")
        self.start_index = n

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.start_index, None)

    def __len__(self) -> int:
        return self.num_samples - self.start_index


class ShardSampler(Sampler[int]):
    """Validation indices ``rank::world_size``: no padding, no duplicates, so summed correct/total is exact.

    Ranks may get a different number of batches (one more at most); keep collectives out of the per-batch loop.
    """

    def __init__(self, dataset_len: int, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}.")
        self.indices = range(rank, dataset_len, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def check_train_size(n_train: int, micro_batch: int, world_size: int) -> None:
    """Every rank needs at least one full micro batch (train.py checks this before any process group starts)."""
    if n_train < micro_batch * world_size:
        raise ConfigError(
            f"the train set has {n_train} images, fewer than micro_batch ({micro_batch}) x world_size "
            f"({world_size}) = {micro_batch * world_size}, so no rank gets a full batch; lower "
            "train_micro_batch_size_per_gpu, use fewer GPUs or a larger dataset."
        )


def build_loaders(
    bundle: DataBundle, micro_batch: int, rank: int, world_size: int, seed: int, num_workers: int
) -> tuple[DataLoader, DataLoader]:
    """(train, val) loaders for this rank. Train: shuffled, padded across ranks, full micro batches only."""
    check_train_size(len(bundle.train), micro_batch, world_size)  # type: ignore[arg-type]
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
    if isinstance(loader.dataset, SeededDataset):
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
