"""`data.loader: device`: JPEG decode and augmentations on the rank's GPU (on the CPU where there is none).

DataLoader workers only read encoded bytes (a file, or a shard member): cheap host work. The training process
decodes each micro batch with ``torchvision.io.decode_jpeg(device="cuda")`` (nvJPEG, one batched call) and runs
torchvision v2 transforms on the decoded uint8 tensors where they are. Images that nvJPEG refuses (PNG, CMYK,
...) are decoded on the host (torchvision, then PIL for what torchvision cannot read) and moved over.

Exact resume, as on the ``torch`` path: the indices come from the same ``ResumableDistributedSampler``; each
sample's random crop, flip and RandAugment draw from the CPU generator seeded with (seed, epoch, index) only
(``SeededDataset``'s seeds), so a sample's augmentation depends neither on its batch, the world size, the worker
count nor the resume point. The parameters are drawn on the host; the pixels never leave the device.

Why torchvision and not DALI (docs/data.md): torchvision is already a dependency and runs the same code on CPU
and GPU; DALI's random operators draw from per-pipeline generator state, so the same sample would get another
augmentation on another world size or after a resume on fewer ranks.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from prelora_ds.config.sections import DataConfig
from prelora_ds.data.images import load_image
from prelora_ds.data.samplers import ResumableDistributedSampler, ShardSampler
from prelora_ds.distributed.preempt import ignore_in_worker
from prelora_ds.errors import ConfigError

__all__ = ["DeviceImages", "DeviceLoader", "build_device_loaders", "build_device_transforms", "sample_seed"]

_U64 = 1 << 64
_JPEG = b"\xff\xd8\xff"
BICUBIC = v2.InterpolationMode.BICUBIC


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The CPU generator seed of one sample's augmentation: the words ``SeededDataset`` seeds torch with."""
    words = np.random.SeedSequence([seed % _U64, epoch, int(index)]).generate_state(5, dtype=np.uint32)
    return int(words[3]) << 32 | int(words[4])


def rand_augment_args(policy: str) -> tuple[int, int]:
    """(num_ops, magnitude) of a timm RandAugment string such as ``rand-m9-mstd0.5-inc1``.

    torchvision's RandAugment with 11 magnitude bins uses timm's scale (level m of 10: shear 0.3, rotate 30 deg,
    enhance 0.9 at m=10) and its posterize/solarize grow with m as timm's ``inc1`` ops do; timm clips m at 10
    (without ``mmax``), so does this. Not reproduced: the per-op magnitude noise ``mstd`` (a fixed magnitude)."""
    parts = policy.split("-")
    if parts[0] != "rand":
        raise ConfigError(
            f"data.auto_augment={policy!r}: data.loader=device runs RandAugment only (a 'rand-m9-n2...' string) or "
            "none (null); use data.loader torch for other timm policies."
        )
    num_ops, magnitude = 2, 10
    for part in parts[1:]:
        match = re.fullmatch(r"([a-z]+)([\d.]*)", part)
        key, value = match.groups() if match else (part, "")
        if key == "m":
            magnitude = min(int(value), 10)
        elif key == "n":
            num_ops = int(value)
        elif key == "mmax":
            raise ConfigError(
                f"data.auto_augment={policy!r}: mmax (magnitudes above 10) is not available with data.loader=device; "
                "remove it or use data.loader torch."
            )
    return num_ops, magnitude


def build_device_transforms(
    cfg: DataConfig, img_size: int, in_chans: int, mean: Sequence[float], std: Sequence[float]
) -> tuple[v2.Transform, v2.Transform]:
    """Per-image (train, val) transforms on uint8 CxHxW tensors, the ``torch`` path's order and parameters:
    RandomResizedCrop (bicubic) -> flip -> RandAugment, and resize to floor(img_size / crop_pct) -> center crop."""
    train: list[v2.Transform] = [
        v2.RandomResizedCrop(img_size, scale=tuple(cfg.scale), interpolation=BICUBIC, antialias=True)
    ]
    if cfg.hflip > 0:
        train.append(v2.RandomHorizontalFlip(cfg.hflip))
    if cfg.auto_augment:
        num_ops, magnitude = rand_augment_args(cfg.auto_augment)
        fill = [round(255 * m) for m in mean][:in_chans]  # timm fills with the mean pixel, not black
        train.append(v2.RandAugment(num_ops, magnitude, num_magnitude_bins=11,
                                    interpolation=v2.InterpolationMode.BILINEAR, fill=fill))
    val = [v2.Resize(math.floor(img_size / cfg.crop_pct), interpolation=BICUBIC, antialias=True),
           v2.CenterCrop(img_size)]
    return v2.Compose(train), v2.Compose(val)


class DeviceImages(Dataset):
    """Encoded images of a file-backed dataset (``RobustImageFolder`` or ``ShardDataset``) for the device path.

    ``__getitem__`` runs in DataLoader workers and returns the bytes (no decode); ``prepare`` runs in the training
    process and turns a batch of them into normalized float tensors on the device."""

    def __init__(
        self, base: Any, transform: v2.Transform, mean: Sequence[float], std: Sequence[float], in_chans: int,
        seed: int | None,
    ) -> None:
        self.base, self.transform, self.seed = base, transform, seed
        self.mean, self.std = list(mean), list(std)
        self.mode = ImageReadMode.GRAY if in_chans == 1 else ImageReadMode.RGB
        self.pil_mode = "L" if in_chans == 1 else "RGB"
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)

    @property
    def num_skipped(self) -> int:
        return self.base.num_skipped

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        try:
            data = self.base.read_bytes(index)
        except OSError:  # unreadable: no bytes fail to decode, and prepare() applies the skip rule
            data = b""
        return _as_tensor(data), self.base.targets[index], index

    # ------------------------------------------------------------------ training process
    def _decode_host(self, data: torch.Tensor) -> torch.Tensor:
        try:
            img = decode_image(data, mode=self.mode)
            if img.dtype != torch.uint8:  # 16-bit PNG
                img = F.to_dtype(img, torch.uint8, scale=True)
            return img
        except RuntimeError:  # a format torchvision does not read (BMP, TIFF, ...): PIL, as the torch path
            img = load_image(io.BytesIO(data.numpy().tobytes()), self.pil_mode)
            return F.pil_to_tensor(img)

    def _decode(self, datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | Exception]:
        """uint8 CxHxW tensors on `device`, or the host decoder's error for an undecodable sample. JPEGs go to
        nvJPEG in one call."""
        out: list[torch.Tensor | Exception | None] = [None] * len(datas)
        if device.type == "cuda":
            jpegs = [i for i, d in enumerate(datas) if bytes(d[:3].tolist()) == _JPEG]
            try:
                for i, img in zip(jpegs, decode_jpeg([datas[i] for i in jpegs], mode=self.mode, device=device),
                                  strict=True):
                    out[i] = img
            except RuntimeError:  # one image nvJPEG refuses (e.g. CMYK) fails the whole call: one by one
                for i in jpegs:
                    try:
                        out[i] = decode_jpeg(datas[i], mode=self.mode, device=device)
                    except RuntimeError:
                        out[i] = None  # the host decoders below try it
        for i, d in enumerate(datas):
            if out[i] is None:
                try:
                    out[i] = self._decode_host(d).to(device, non_blocking=True)
                except Exception as exc:  # any decoder failure = an unreadable file, as in images.SkipUnreadable
                    out[i] = exc
        return out  # type: ignore[return-value]

    def _replacement(self, index: int, device: torch.device) -> tuple[torch.Tensor, int]:
        """The next readable sample after an unreadable one: the ``torch`` path's skip rule (images.py)."""
        def read(j: int) -> torch.Tensor:
            return self._decode_host(_as_tensor(self.base.read_bytes(j)))

        j, img = self.base.first_readable(index, read)
        return img.to(device), self.base.targets[j]

    def prepare(
        self, datas: list[torch.Tensor], targets: torch.Tensor, indices: Sequence[int], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        images = self._decode(datas, device)
        targets = targets.clone()
        cpu_rng = torch.get_rng_state()  # the training loop's own randomness is untouched
        try:
            out = []
            for k, (img, index) in enumerate(zip(images, indices, strict=True)):
                if isinstance(img, Exception):
                    self.base.mark_bad(int(index), img)
                    img, targets[k] = self._replacement(int(index), device)
                if self.seed is not None:
                    torch.default_generator.manual_seed(sample_seed(self.seed, self.epoch, int(index)))
                out.append(self.transform(img))
        finally:
            torch.set_rng_state(cpu_rng)
        batch = F.to_dtype(torch.stack(out), torch.float32, scale=True)
        return F.normalize(batch, self.mean, self.std), targets.to(device, non_blocking=True)


def _as_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


def _collate(items: list[tuple[torch.Tensor, int, int]]) -> tuple[torch.Tensor, list[int], torch.Tensor, list[int]]:
    """One flat byte tensor per batch (one shared-memory segment from a worker instead of one per image)."""
    datas, targets, indices = zip(*items, strict=True)
    return torch.cat(datas), [len(d) for d in datas], torch.tensor(targets, dtype=torch.long), list(indices)


class DeviceLoader:
    """What the trainer needs of a DataLoader (``len``, ``sampler``, ``dataset.set_epoch``, iteration), yielding
    ``(images, targets)`` already on `device`; workers read bytes, this process decodes and augments."""

    def __init__(self, dataset: DeviceImages, sampler: Any, batch_size: int, drop_last: bool, num_workers: int,
                 device: torch.device, seed: int) -> None:
        self.dataset, self.sampler, self.device = dataset, sampler, device
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=num_workers,
            collate_fn=_collate,
            drop_last=drop_last,
            generator=torch.Generator().manual_seed(seed),  # worker base seeds never draw from the global RNG
            worker_init_fn=ignore_in_worker,
            persistent_workers=False,
            prefetch_factor=4 if num_workers else None,  # bytes are small: keep the decoder fed
        )

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for flat, lengths, targets, indices in self.loader:
            yield self.dataset.prepare(list(torch.split(flat, lengths)), targets, indices, self.device)


def input_device() -> torch.device:
    """The rank's accelerator (set by init_distributed before the loaders are built), or the CPU."""
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def build_device_loaders(
    bundle: Any, micro_batch: int, rank: int, world_size: int, seed: int, num_workers: int,
    device: torch.device | None = None,
) -> tuple[DeviceLoader, DeviceLoader]:
    """The device path's (train, val) loaders: the same samplers, batch rules and seeds as ``build_loaders``."""
    device = device or input_device()
    sampler = ResumableDistributedSampler(
        bundle.train, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=False
    )
    train = DeviceLoader(bundle.train, sampler, micro_batch, True, num_workers, device, seed + rank)
    val_sampler = ShardSampler(len(bundle.val), rank, world_size)
    val = DeviceLoader(bundle.val, val_sampler, micro_batch, False, num_workers, device, seed + rank)
    return train, val
