"""Image decoding and the skip-unreadable-files policy shared by every file-backed dataset.

``load_image`` turns any file PIL reads (a path or an open binary file) into 'RGB' or 'L'. ``SkipUnreadable``
holds the "known bad" flags and the replace-by-next-readable-index rule; ``RobustImageFolder`` (files) and
``shards.ShardDataset`` (tar members) use it, in DataLoader workers (the ``torch`` loader) or in the training
process (the ``device`` loader, which decodes there).
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes

from prelora_ds.errors import ConfigError

__all__ = ["RobustImageFolder", "SkipUnreadable", "check_imagefolder", "check_nonempty", "load_image"]


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


def load_image(path: str | Path | IO[bytes], mode: str = "RGB") -> Image.Image:
    """Decode `path` (a file name or an open binary file) fully and convert it to `mode` ('RGB' or 'L').

    Decoding happens here (``img.load()``), not lazily in the transform, so truncated or corrupt files raise
    inside the caller's guard. Alpha is dropped as torchvision's ``pil_loader`` does, so pretrained models see
    the colours they were trained on.
    """
    if isinstance(path, (str, Path)):
        with open(path, "rb") as f:
            img = Image.open(f)
            img.load()
    else:
        img = Image.open(path)
        img.load()
    if img.mode == mode:
        return img
    if img.mode.startswith("I") or img.mode == "F":
        img = _high_bit_depth_to_l(img)
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL warns when converting palette+transparency straight to RGB
    return img.convert(mode)


class SkipUnreadable:
    """Skip unreadable samples instead of crashing the run.

    A sample that fails to decode is replaced, deterministically, by the next readable index (wrapping around),
    warned about once (``warnings.warn`` naming it) and counted. The "known bad" flags live in a lock-free
    ``multiprocessing.Array``, i.e. in shared memory inherited (fork) or passed at start-up (spawn/forkserver) by
    every DataLoader worker: so ``num_skipped``, read in the main process, counts files skipped in any worker, each
    once, across epochs and the short-lived workers of each epoch. Without a lock (a SemLock would tie the dataset
    to one start method) two workers that hit the same bad file at the same instant may both warn; the count stays
    exact because setting a flag is idempotent. The count is per rank; all-reduce it for a global number.
    """

    def _init_flags(self, n: int) -> None:
        self._bad = mp.Array("b", max(n, 1), lock=False)  # shared int8 flags, one per sample
        self._n = n

    source: str = "the dataset"
    """Where the samples come from, for messages (a folder, a shard set)."""

    def sample_name(self, index: int) -> str:
        raise NotImplementedError

    @property
    def num_skipped(self) -> int:
        """Samples found unreadable so far, by this process or any of its DataLoader workers."""
        return int(np.count_nonzero(np.frombuffer(self._bad, dtype=np.int8)[: self._n]))

    @property
    def skipped_paths(self) -> list[str]:
        flags = np.frombuffer(self._bad, dtype=np.int8)[: self._n]
        return [self.sample_name(int(i)) for i in np.flatnonzero(flags)]

    def mark_bad(self, index: int, exc: BaseException) -> None:
        first = not self._bad[index]
        self._bad[index] = 1
        if first:
            name = self.sample_name(index)
            warnings.warn(f"skipping unreadable image {name}: {type(exc).__name__}: {exc}", UserWarning, stacklevel=3)

    def first_readable(self, index: int, read: Callable[[int], Any]) -> tuple[int, Any]:
        """(j, read(j)) for the first j >= index (wrapping) whose read does not raise; bad ones are marked."""
        for k in range(self._n):
            j = (index + k) % self._n
            if self._bad[j]:
                continue
            try:
                return j, read(j)
            except Exception as exc:  # any decoder failure (OSError, SyntaxError, DecompressionBomb...) = bad file
                self.mark_bad(j, exc)
        raise RuntimeError(f"none of the {self._n} images under {self.source} can be read; check the dataset files.")


class RobustImageFolder(SkipUnreadable, ImageFolder):
    """torchvision ``ImageFolder`` that skips unreadable files (``SkipUnreadable``) instead of crashing the run."""

    def __init__(self, root: str | Path, transform: Callable[[Any], Any] | None = None, mode: str = "RGB") -> None:
        loader = functools.partial(load_image, mode=mode)
        ImageFolder.__init__(self, str(root), transform=transform, loader=loader, allow_empty=True)
        self.mode = mode
        self.source = str(root)
        self._init_flags(len(self.samples))

    def sample_name(self, index: int) -> str:
        return self.samples[index][0]

    def read_bytes(self, index: int) -> bytes:
        """The file's encoded bytes (the ``device`` loader decodes them in the training process)."""
        with open(self.samples[index][0], "rb") as f:
            return f.read()

    def __getitem__(self, index: int) -> tuple[Any, int]:
        j, img = self.first_readable(index, lambda i: self.loader(self.samples[i][0]))
        # Transform errors are bugs, not bad files: they are deliberately not caught.
        if self.transform is not None:
            img = self.transform(img)
        target = self.samples[j][1]
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target


def check_imagefolder(root: Path) -> list[str]:
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


def check_nonempty(ds: ImageFolder, split_dir: Path) -> None:
    counts = np.bincount(np.asarray(ds.targets, dtype=np.int64), minlength=len(ds.classes))
    empty = [ds.classes[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        shown = ", ".join(empty[:5]) + (f" (+{len(empty) - 5} more)" if len(empty) > 5 else "")
        raise ConfigError(
            f"class folder(s) {shown} under {split_dir} hold no images (extensions: "
            f"{' '.join(IMG_EXTENSIONS)}); add images or remove the folder(s)."
        )
