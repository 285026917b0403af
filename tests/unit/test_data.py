"""Data pipeline tests on real libraries: sklearn digits, PIL-made image folders, timm transforms, torch samplers."""

from __future__ import annotations

import random
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy

from prelora_ds.config.sections import DataConfig
from prelora_ds.data.datasets import (
    DataBundle,
    SeededDataset,
    build_datasets,
    build_loaders,
    build_mixup,
    build_train_loss,
    set_train_epoch,
)
from prelora_ds.data.samplers import ResumableDistributedSampler, ShardSampler
from prelora_ds.errors import ConfigError

IMG = 32


def _save(img: Image.Image, path: Path, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)


def _noise(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)


def _make_folder(root: Path, classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 2) -> None:
    for split in ("train", "val"):
        for c, name in enumerate(classes):
            for k in range(per_class):
                _save(_noise("RGB", (20 + 7 * k, 17 + 5 * c), seed=k + 10 * c), root / split / name / f"{k}.png")


@pytest.fixture
def mixed_folder(tmp_path: Path) -> Path:
    """train/ with every common PIL mode, odd sizes, a truncated JPEG and a text file named .jpg."""
    _make_folder(tmp_path)
    train = tmp_path / "train"
    _save(_noise("L", (31, 9), 1), train / "cat" / "gray.png")
    _save(_noise("RGBA", (13, 40), 2), train / "cat" / "alpha.png")
    _save(_noise("RGB", (25, 25), 3).convert("P", palette=Image.Palette.ADAPTIVE), train / "dog" / "palette.png")
    _save(_noise("CMYK", (50, 12), 4), train / "dog" / "cmyk.jpg")
    _save(Image.fromarray(np.arange(400, dtype=np.uint16).reshape(20, 20) * 150), train / "dog" / "deep16.png")
    full = train / "dog" / "full.jpg"
    _save(_noise("RGB", (64, 64), 5), full, quality=95)
    (train / "cat" / "truncated.jpg").write_bytes(full.read_bytes()[: len(full.read_bytes()) // 3])
    (train / "dog" / "notes.jpg").write_text("this is not an image\n")
    return tmp_path


def _folder_cfg(root: Path, **kwargs) -> DataConfig:
    return DataConfig(dataset="imagefolder", root=str(root), **kwargs)


# --------------------------------------------------------------------------------------------------------------------
# digits / synthetic
# --------------------------------------------------------------------------------------------------------------------


def test_digits_shapes_split_and_stratification() -> None:
    bundle = build_datasets(DataConfig(dataset="digits", val_fraction=0.2), img_size=IMG, seed=3)
    assert isinstance(bundle, DataBundle) and isinstance(bundle.train, SeededDataset)
    assert bundle.num_classes == 10 and bundle.class_names == [str(i) for i in range(10)]
    assert len(bundle.train) + len(bundle.val) == 1797
    assert len(bundle.val) == pytest.approx(0.2 * 1797, abs=1)
    train_counts = Counter(bundle.train.dataset.targets)
    val_counts = Counter(bundle.val.targets)
    for c in range(10):  # every class keeps its share (~20%) in val
        assert val_counts[c] / (train_counts[c] + val_counts[c]) == pytest.approx(0.2, abs=0.02)
    x, y = bundle.train[0]
    assert x.shape == (3, IMG, IMG) and x.dtype == torch.float32 and 0 <= y < 10
    xv, _ = bundle.val[0]
    assert xv.shape == (3, IMG, IMG)
    gray = build_datasets(DataConfig(dataset="digits"), img_size=IMG, in_chans=1)
    assert gray.train[0][0].shape == (1, IMG, IMG) and gray.val[0][0].shape == (1, IMG, IMG)


def test_digits_split_is_seeded() -> None:
    a = build_datasets(DataConfig(dataset="digits"), img_size=IMG, seed=1).val
    b = build_datasets(DataConfig(dataset="digits"), img_size=IMG, seed=1).val
    c = build_datasets(DataConfig(dataset="digits"), img_size=IMG, seed=2).val
    assert np.array_equal(a.images, b.images) and not np.array_equal(a.images, c.images)


def test_synthetic_is_lazy_and_seeded() -> None:
    cfg = DataConfig(dataset="synthetic", synthetic_train_size=10**9, synthetic_val_size=5, synthetic_num_classes=7)
    bundle = build_datasets(cfg, img_size=IMG, seed=0)
    assert len(bundle.train) == 10**9 and len(bundle.val) == 5 and bundle.num_classes == 7
    x, y = bundle.train[10**9 - 1]
    assert x.shape == (3, IMG, IMG) and 0 <= y < 7
    assert torch.equal(bundle.val[2][0], build_datasets(cfg, img_size=IMG, seed=0).val[2][0])
    assert not torch.equal(bundle.val[2][0], build_datasets(cfg, img_size=IMG, seed=1).val[2][0])


# --------------------------------------------------------------------------------------------------------------------
# imagefolder
# --------------------------------------------------------------------------------------------------------------------


def test_imagefolder_loads_every_mode_and_skips_bad_files(mixed_folder: Path) -> None:
    bundle = build_datasets(_folder_cfg(mixed_folder), img_size=IMG)
    assert bundle.class_names == ["cat", "dog"] and bundle.num_classes == 2
    n = len(bundle.train)
    assert n == 4 + 8
    with pytest.warns(UserWarning) as record:
        items = [bundle.train[i] for i in range(n)]
    warned = sorted(name for w in record for name in ("notes.jpg", "truncated.jpg") if name in str(w.message))
    assert warned == ["notes.jpg", "truncated.jpg"]  # once per file, naming it
    assert all(x.shape == (3, IMG, IMG) and x.dtype == torch.float32 for x, _ in items)
    assert bundle.num_skipped == 2 and bundle.train.num_skipped == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second pass neither re-warns nor re-counts
        [bundle.train[i] for i in range(n)]
    assert bundle.num_skipped == 2
    gray = build_datasets(_folder_cfg(mixed_folder), img_size=IMG, in_chans=1)
    with pytest.warns(UserWarning):
        assert all(gray.train[i][0].shape == (1, IMG, IMG) for i in range(n))


def test_bad_file_is_replaced_by_next_readable_index(mixed_folder: Path) -> None:
    cfg = _folder_cfg(mixed_folder, auto_augment=None)
    ds = build_datasets(cfg, img_size=IMG).val  # deterministic transform
    train = build_datasets(cfg, img_size=IMG).train.dataset
    train.transform = ds.transform
    bad = next(i for i, (p, _) in enumerate(train.samples) if p.endswith("truncated.jpg"))
    with pytest.warns(UserWarning, match="truncated.jpg"):
        x_bad, y_bad = train[bad]
    x_next, y_next = train[bad + 1]
    assert torch.equal(x_bad, x_next) and y_bad == y_next


def test_skip_count_is_shared_with_dataloader_workers(mixed_folder: Path) -> None:
    bundle = build_datasets(_folder_cfg(mixed_folder), img_size=IMG)
    train_loader, _ = build_loaders(bundle, micro_batch=2, rank=0, world_size=1, seed=0, num_workers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = list(train_loader)
    assert len(batches) == len(bundle.train) // 2
    assert bundle.num_skipped == 2  # counted in the workers, read in the main process


@pytest.mark.parametrize(
    ("breakage", "match"),
    [
        ("no_root", "does not exist"),
        ("no_train", "has no train/ folder"),
        ("no_val", "has no val/ folder"),
        ("no_classes", "has no class folders"),
        ("empty_class", "bird"),
        ("class_mismatch", "missing from val/: dog"),
    ],
)
def test_imagefolder_config_errors(tmp_path: Path, breakage: str, match: str) -> None:
    root = tmp_path / "data"
    if breakage != "no_root":
        _make_folder(root)
    if breakage == "no_train":
        for p in sorted((root / "train").rglob("*"), reverse=True):
            p.rmdir() if p.is_dir() else p.unlink()
        (root / "train").rmdir()
    elif breakage == "no_val":
        (root / "val").rename(root / "validation")
    elif breakage == "no_classes":
        (root / "val").rename(root / "old_val")
        (root / "val").mkdir()
        _save(_noise("RGB", (8, 8), 0), root / "val" / "loose.png")
    elif breakage == "empty_class":
        for split in ("train", "val"):
            (root / split / "bird").mkdir()
            (root / split / "bird" / "readme.txt").write_text("no images here")
    elif breakage == "class_mismatch":
        for p in (root / "val" / "dog").iterdir():
            p.rename(root / "val" / "cat" / f"dog_{p.name}")
        (root / "val" / "dog").rmdir()
    with pytest.raises(ConfigError, match=match):
        build_datasets(_folder_cfg(root), img_size=IMG)


# --------------------------------------------------------------------------------------------------------------------
# determinism
# --------------------------------------------------------------------------------------------------------------------


def test_seeded_dataset_is_reproducible_and_keeps_caller_rng() -> None:
    ds = build_datasets(DataConfig(dataset="digits"), img_size=IMG, seed=5).train
    ds.set_epoch(0)
    first = ds[7][0]
    ds[3]
    again = ds[7][0]
    ds.set_epoch(1)
    other_epoch = ds[7][0]
    assert torch.equal(first, again)
    assert not torch.equal(first, other_epoch)

    random.seed(11)
    np.random.seed(11)
    torch.manual_seed(11)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(11)
    np.random.seed(11)
    torch.manual_seed(11)
    ds[7]
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1), expected[2])


def test_loader_batches_do_not_depend_on_worker_count_and_keep_global_rng() -> None:
    bundle = build_datasets(DataConfig(dataset="digits"), img_size=16, seed=0)
    bundle.train = SeededDataset(torch.utils.data.Subset(bundle.train.dataset, range(24)), seed=0)
    runs = []
    for workers in (0, 2):
        loader, _ = build_loaders(bundle, micro_batch=8, rank=0, world_size=1, seed=0, num_workers=workers)
        set_train_epoch(loader, epoch=2)
        torch.manual_seed(0)
        runs.append([x for x, _ in loader])
        after = torch.rand(3)
        torch.manual_seed(0)
        assert torch.equal(after, torch.rand(3))  # iterating the loader did not draw from the global RNG
    assert len(runs[0]) == 3 and all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


# --------------------------------------------------------------------------------------------------------------------
# samplers / loaders
# --------------------------------------------------------------------------------------------------------------------


def test_resumable_sampler_skip_is_tail_of_unskipped_order() -> None:
    data = list(range(23))
    for rank in range(2):
        sampler = ResumableDistributedSampler(data, num_replicas=2, rank=rank, shuffle=True, seed=4)
        sampler.set_epoch(3)
        full = list(sampler)
        assert len(full) == 12 == len(sampler)
        sampler.skip(5)
        assert list(sampler) == full[5:] and len(sampler) == 7
        sampler.set_epoch(3)  # the skip is for one epoch only
        assert list(sampler) == full
        sampler.set_epoch(4)
        assert list(sampler) != full
    with pytest.raises(ValueError):
        sampler.skip(13)


def test_shard_sampler_covers_each_index_once() -> None:
    shards = [list(ShardSampler(10, rank, 3)) for rank in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(10))
    assert [len(ShardSampler(10, r, 3)) for r in range(3)] == [4, 3, 3]


def test_loaders_yield_full_micro_batches() -> None:
    cfg = DataConfig(dataset="synthetic", synthetic_train_size=45, synthetic_val_size=11, synthetic_num_classes=5)
    bundle = build_datasets(cfg, img_size=16)
    for rank in range(2):
        train, val = build_loaders(bundle, micro_batch=4, rank=rank, world_size=2, seed=0, num_workers=0)
        set_train_epoch(train, 0)
        shapes = [tuple(x.shape) for x, _ in train]
        assert shapes == [(4, 3, 16, 16)] * 5  # 23 samples per rank after padding -> 5 full batches
        set_train_epoch(train, 0, skip_samples=8)
        assert len(list(train)) == 3
        assert sum(len(y) for _, y in val) == len(range(rank, 11, 2))
    with pytest.raises(ConfigError, match="fewer than micro_batch"):
        build_loaders(bundle, micro_batch=32, rank=0, world_size=2, seed=0, num_workers=0)


# --------------------------------------------------------------------------------------------------------------------
# mixup / loss
# --------------------------------------------------------------------------------------------------------------------


def test_mixup_and_loss() -> None:
    off = DataConfig(mixup=0.0, cutmix=0.0, label_smoothing=0.1)
    assert build_mixup(off, 10) is None
    loss = build_train_loss(off, mixup_active=False)
    assert isinstance(loss, torch.nn.CrossEntropyLoss) and loss.label_smoothing == 0.1

    on = DataConfig(mixup=0.8, cutmix=1.0, label_smoothing=0.1)
    mixup = build_mixup(on, 10)
    assert isinstance(mixup, Mixup) and mixup.label_smoothing == 0.1 and mixup.num_classes == 10
    assert isinstance(build_train_loss(on, mixup_active=True), SoftTargetCrossEntropy)
    x, target = mixup(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]))
    assert target.shape == (4, 10) and torch.allclose(target.sum(1), torch.ones(4))
    with pytest.raises(ConfigError, match="even micro batch"):
        build_mixup(on, 10, micro_batch=3)
