"""Tar shards of an ImageFolder, read by index: the package's sampler decides the order, so resume is exact.

On a network filesystem 1.28M small files cost one metadata round trip each; a few hundred tar files of about
100 MB do not. ``write_shards`` (``prelora pack-shards``) packs ``train/`` and ``val/`` in ImageFolder order
(sorted classes, sorted files), so sample i of a shard set is sample i of the ImageFolder: the same sampler
indices give the same images, and a run can even move from the folder to its shards at a resume.

Members follow webdataset's naming (``000000042.jpg`` + ``000000042.cls``), so webdataset or wids read the shards
too. This package does not stream them with webdataset: its shuffle (shard order + a sample buffer) depends on
the worker count and cannot restart mid-epoch at a given sample, while here ``ResumableDistributedSampler``
picks each index and ``ShardDataset`` reads that member with one ``pread`` at the offset ``index.json``'s
table gives (built by ``tarfile`` reading back each finished shard).

Layout of a shard set::

    index.json          format, classes, per split: shards [{name, bytes, count}], num_samples, resize, quality
    train.index.npy     int64 (num_samples, 4): shard number, data offset, data size, label
    train-000000.tar ...
    val.index.npy, val-000000.tar ...
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from prelora_ds.data.images import SkipUnreadable, load_image
from prelora_ds.errors import ConfigError

__all__ = ["FORMAT", "ShardDataset", "check_shards", "read_index", "write_shards"]

FORMAT = "prelora_ds-shards-1"
SPLITS = ("train", "val")
PACK_HINT = "pack the ImageFolder with `prelora pack-shards SRC_ROOT OUT_DIR` and pass --data.root OUT_DIR"


# --------------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------------


def encode(path: str, resize_shorter: int | None, quality: int | None) -> tuple[bytes, str]:
    """The bytes to store for one image and their extension. Without `resize_shorter`/`quality` the file's own
    bytes (the shards then hold exactly the ImageFolder's images); otherwise an RGB JPEG at `quality`, its
    shorter side scaled down to `resize_shorter` (never up). A file PIL cannot read is stored as it is, so the
    reader skips it exactly as the ImageFolder would."""
    raw = Path(path).read_bytes()
    ext = Path(path).suffix.lower().lstrip(".") or "bin"
    if resize_shorter is None and quality is None:
        return raw, ext
    try:
        img = load_image(io.BytesIO(raw), "RGB")
    except Exception:  # unreadable: keep it, the reader's skip policy applies
        return raw, ext
    if resize_shorter is not None and min(img.size) > resize_shorter:
        w, h = img.size
        s = resize_shorter / min(w, h)
        img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BICUBIC, reducing_gap=3.0)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality or 90)
    return out.getvalue(), "jpg"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # byte-identical shards from identical inputs
    tar.addfile(info, io.BytesIO(data))


def member_table(path: Path) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of every image member of a tar, in order, as ``tarfile`` reads them."""
    with tarfile.open(path, "r:") as tar:
        return [(m.name, m.offset_data, m.size) for m in tar if m.isfile() and not m.name.endswith(".cls")]


def _write_shard(job: tuple[Path, Sequence[tuple[int, str, int]], int | None, int | None]) -> dict[str, Any]:
    path, items, resize_shorter, quality = job
    tmp = path.with_suffix(".tar.tmp")
    with tarfile.open(tmp, "w:", format=tarfile.USTAR_FORMAT) as tar:
        for index, src, label in items:
            data, ext = encode(src, resize_shorter, quality)
            _add(tar, f"{index:09d}.{ext}", data)
            _add(tar, f"{index:09d}.cls", str(label).encode())
    table = member_table(tmp)
    if len(table) != len(items):
        raise RuntimeError(f"{tmp}: wrote {len(items)} images, read back {len(table)}")
    os.replace(tmp, path)
    return {"name": path.name, "bytes": path.stat().st_size, "count": len(items),
            "rows": [(off, size, label) for (_, off, size), (_, _, label) in zip(table, items, strict=True)]}


def write_shards(
    src: str | Path,
    out: str | Path,
    shard_size: int = 1000,
    resize_shorter: int | None = None,
    quality: int | None = None,
    workers: int = 1,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Pack ``src/train`` and ``src/val`` (ImageFolder layouts) into tar shards under `out`; returns index.json's
    content. index.json is written last: a shard set without it is incomplete."""
    from multiprocessing import get_context

    from prelora_ds.data.images import RobustImageFolder, check_imagefolder

    src, out = Path(src), Path(out)
    classes = check_imagefolder(src)
    out.mkdir(parents=True, exist_ok=True)
    (out / "index.json").unlink(missing_ok=True)
    index: dict[str, Any] = {"format": FORMAT, "classes": classes, "resize_shorter": resize_shorter,
                             "quality": quality, "source": src.name, "splits": {}}
    for split in SPLITS:
        samples = RobustImageFolder(src / split).samples
        jobs = [
            (out / f"{split}-{k // shard_size:06d}.tar",
             [(i, p, y) for i, (p, y) in enumerate(samples[k : k + shard_size], start=k)], resize_shorter, quality)
            for k in range(0, len(samples), shard_size)
        ]
        t0 = time.perf_counter()
        rows, shards = [], []
        with get_context("spawn").Pool(workers) if workers > 1 else _Serial() as pool:
            for number, done in enumerate(pool.imap(_write_shard, jobs)):
                rows += [(number, off, size, label) for off, size, label in done.pop("rows")]
                shards.append(done)
                log(f"{split}: {done['name']} ({done['count']} images, {done['bytes'] / 2**20:.1f} MiB)")
        np.save(out / f"{split}.index.npy", np.asarray(rows, dtype=np.int64).reshape(-1, 4))
        index["splits"][split] = {"shards": shards, "num_samples": len(samples),
                                  "bytes": sum(s["bytes"] for s in shards)}
        log(f"{split}: {len(samples)} images in {len(shards)} shards, {time.perf_counter() - t0:.1f} s")
    (out / "index.json").write_text(json.dumps(index, indent=1))
    return index


class _Serial:
    """``Pool``'s interface in this process (workers=1)."""

    def __enter__(self) -> _Serial:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def imap(self, fn: Callable[[Any], Any], jobs: Sequence[Any]) -> Iterator[Any]:
        return map(fn, jobs)


# --------------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------------


def read_index(root: str | Path) -> dict[str, Any]:
    """index.json, checked against the files: a missing, partial or changed shard set fails here, with what to do."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ConfigError(f"data.root={str(root)!r} (data.dataset=shards) is not a folder; {PACK_HINT}.")
    path = root / "index.json"
    if not path.is_file():
        raise ConfigError(
            f"{root} has no index.json: it is not a shard set written by `prelora pack-shards`, or the packing did "
            f"not finish (index.json is written last); {PACK_HINT}."
        )
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} cannot be read ({exc}); {PACK_HINT} again.") from exc
    found = index.get("format") if isinstance(index, dict) else None
    if found != FORMAT:
        raise ConfigError(f"{path} is not a {FORMAT} index (format {found!r}); {PACK_HINT}.")
    return index


def check_shards(root: str | Path) -> dict[str, Any]:
    """read_index + every shard present at its recorded size and every table complete (a stat per shard)."""
    root = Path(root).expanduser()
    index = read_index(root)
    for split in SPLITS:
        info = index["splits"].get(split)
        if not info or not info["num_samples"]:
            raise ConfigError(f"the shard set {root} has no {split} images; pack an ImageFolder with {split}/ images.")
        for shard in info["shards"]:
            path = root / shard["name"]
            if not path.is_file():
                raise ConfigError(
                    f"shard {path} listed in {root / 'index.json'} is missing; copy the whole shard set again "
                    "or re-run `prelora pack-shards`."
                )
            size = path.stat().st_size
            if size != shard["bytes"]:
                raise ConfigError(
                    f"shard {path} is {size} bytes but index.json records {shard['bytes']}: a truncated or changed "
                    "copy; copy it again or re-run `prelora pack-shards`."
                )
        table = root / f"{split}.index.npy"
        try:
            rows = np.load(table, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{table} cannot be read ({exc}); re-run `prelora pack-shards`.") from exc
        if rows.shape != (info["num_samples"], 4):
            raise ConfigError(
                f"{table} holds {rows.shape[0]} rows, index.json {info['num_samples']} images; re-run "
                "`prelora pack-shards`."
            )
    return index


class ShardDataset(SkipUnreadable, Dataset):
    """One split of a shard set as a map-style dataset: ``(transform(image), label)`` for index i, read with one
    ``os.pread`` from the shard that holds it. File handles are opened per process (workers open their own)."""

    def __init__(
        self, root: str | Path, split: str, transform: Callable[[Any], Any] | None = None, mode: str = "RGB",
        index: dict[str, Any] | None = None,
    ) -> None:
        self.root = Path(root).expanduser()
        index = index or read_index(self.root)
        self.classes: list[str] = list(index["classes"])
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.shards = [self.root / s["name"] for s in index["splits"][split]["shards"]]
        self.rows = np.load(self.root / f"{split}.index.npy")
        self.targets = self.rows[:, 3].tolist()
        self.split, self.transform, self.mode = split, transform, mode
        self.source = f"{self.root} ({split} shards)"
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()
        self._init_flags(len(self.rows))

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fds": {}}  # descriptors do not travel to spawned workers

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            if getattr(self, "_pid", None) == os.getpid():
                os.close(fd)

    def sample_name(self, index: int) -> str:
        return f"{self.shards[int(self.rows[index, 0])]}:{index:09d}"

    def read_bytes(self, index: int) -> bytes:
        shard, offset, size, _ = (int(v) for v in self.rows[index])
        if self._pid != os.getpid():  # a forked worker: open its own descriptors
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.shards[shard], os.O_RDONLY)
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise OSError(f"short read: {len(data)} of {size} bytes (shard truncated after the start-up check?)")
        return data

    def __getitem__(self, index: int) -> tuple[Any, int]:
        j, img = self.first_readable(index, lambda i: load_image(io.BytesIO(self.read_bytes(i)), self.mode))
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[j]
