"""The device input path (torchvision decode + v2 augmentations on the rank's device, here the CPU) and the
shard reader, against today's `torch` path on the same real JPEGs (scikit-learn digits written as files)."""

from __future__ import annotations

import json
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from prelora_ds.config.sections import DataConfig
from prelora_ds.data.datasets import build_datasets, build_loaders, set_train_epoch
from prelora_ds.data.shards import write_shards
from prelora_ds.errors import ConfigError
from prelora_ds.testing.harness import write_digit_jpegs

IMG = 24
AUG = dict(auto_augment="rand-m9-mstd0.5-inc1", hflip=0.5, scale=[0.3, 1.0], crop_pct=0.875)
STD = (0.229, 0.224, 0.225)  # ImageNet's, build_datasets' default
ONE_LEVEL = 1 / 255 / min(STD)  # one uint8 step after normalization


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_digit_jpegs(tmp_path_factory.mktemp("digits") / "folder", count=300)


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits") / "shards"
    write_shards(folder, out, shard_size=64, log=lambda s: None)
    return out


def bundle(root: Path, dataset: str = "imagefolder", loader: str = "torch", seed: int = 0, **kw):
    cfg = DataConfig(dataset=dataset, root=str(root), loader=loader, **{**AUG, **kw})
    return build_datasets(cfg, img_size=IMG, seed=seed)


def batches(loader, epoch: int | None = None, skip: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    if epoch is not None:
        set_train_epoch(loader, epoch, skip)
    xs, ys = zip(*list(loader), strict=True)
    return torch.cat(xs), torch.cat(ys)


def test_device_val_transform_matches_the_torch_path(folder):
    """Resize (bicubic, antialiased) + center crop on uint8 tensors against timm's PIL transform: at most one
    uint8 level apart (PIL's and torchvision's bicubic round differently), almost everywhere equal."""
    _, val_torch = build_loaders(bundle(folder), 16, 0, 1, 0, 0)
    _, val_device = build_loaders(bundle(folder, loader="device"), 16, 0, 1, 0, 0)
    (xa, ya), (xb, yb) = batches(val_torch), batches(val_device)
    assert xa.shape == xb.shape == (60, 3, IMG, IMG) and torch.equal(ya, yb)
    diff = (xa - xb).abs()
    print(f"val transform, device vs torch: max {diff.max():.4f}, mean {diff.mean():.2e} (one level {ONE_LEVEL:.4f})")
    assert diff.max() <= ONE_LEVEL + 1e-5
    assert diff.mean() <= 0.02 * ONE_LEVEL


def test_device_augmentation_is_a_function_of_seed_epoch_and_index(folder):
    """The same sample gets the same crop/flip/RandAugment whatever its batch, the world size, the worker count or
    a resume's skip; another epoch gives another one; the training process's RNG is not touched."""
    data = bundle(folder, loader="device", seed=3)
    one, _ = build_loaders(data, 8, 0, 1, 3, 0)
    torch.manual_seed(0)
    x1, _ = batches(one, epoch=2)
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(3))  # augmenting drew nothing from the training process's RNG
    by_index = dict(zip(list(one.sampler), x1, strict=False))
    for rank in range(2):
        loader, _ = build_loaders(data, 8, rank, 2, 3, 2)  # two workers reading bytes
        x2, _ = batches(loader, epoch=2, skip=8)
        indices = list(loader.sampler)
        assert len(indices) == len(x2) and len(x2) > 0
        for i, x in zip(indices, x2, strict=True):
            assert torch.equal(x, by_index[i]), i
    x3, _ = batches(one, epoch=3)
    assert not torch.equal(x1[:8], x3[:8])
    assert x1.shape[1:] == (3, IMG, IMG) and x1.isfinite().all() and 0.5 < float(x1.std()) < 3


def test_shards_hold_the_imagefolder_in_its_order(folder, shards):
    """Sample i of the shards is sample i of the ImageFolder (same bytes, same label), the members carry
    webdataset's names, and the torch loader yields the same batches from either for the same sampler."""
    from prelora_ds.data.images import RobustImageFolder
    from prelora_ds.data.shards import ShardDataset

    for split in ("train", "val"):
        files, packed = RobustImageFolder(folder / split), ShardDataset(shards, split)
        assert packed.classes == files.classes and packed.targets == files.targets and len(packed) == len(files)
        for i, (path, _) in enumerate(files.samples):
            assert packed.read_bytes(i) == Path(path).read_bytes(), (split, i)
    with tarfile.open(shards / "train-000000.tar") as tar:
        assert tar.getnames()[:4] == ["000000000.jpg", "000000000.cls", "000000001.jpg", "000000001.cls"]
    a, b = bundle(folder), bundle(shards, "shards")
    assert a.class_names == b.class_names
    for rank in range(2):
        ta, va = build_loaders(a, 8, rank, 2, 0, 0)
        tb, vb = build_loaders(b, 8, rank, 2, 0, 2)
        xa, ya = batches(ta, epoch=1, skip=16)
        xb, yb = batches(tb, epoch=1, skip=16)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert all(torch.equal(u, v) for u, v in zip(batches(va), batches(vb), strict=True))


def test_pack_resized_shards(folder, tmp_path):
    """--resize-shorter scales down (never up) and re-encodes at the quality asked."""
    out = tmp_path / "small"
    index = write_shards(folder, out, shard_size=100, resize_shorter=18, quality=75, log=lambda s: None)
    assert index["resize_shorter"] == 18 and index["quality"] == 75
    from prelora_ds.data.images import RobustImageFolder
    from prelora_ds.data.shards import ShardDataset

    files, packed = RobustImageFolder(folder / "train"), ShardDataset(out, "train")
    for i in range(0, len(files), 7):
        with Image.open(files.samples[i][0]) as src:
            before = src.size
        img = packed[i][0]
        assert min(img.size) == min(18, min(before)), (before, img.size)
        assert abs(img.size[0] / img.size[1] - before[0] / before[1]) < 0.1
    assert packed.read_bytes(0)[:3] == b"\xff\xd8\xff"
    assert json.loads((out / "index.json").read_text()) == index


def test_device_path_reads_every_format_and_skips_unreadable_files_like_the_torch_path(tmp_path):
    """Grayscale, palette PNG and CMYK files decode on the host and join the batch; a truncated JPEG, a text file
    and a file deleted after the scan are replaced by the next readable index, as the torch path does, and
    counted (the device path's workers only read bytes; the training process decodes and applies the rule)."""
    root = write_digit_jpegs(tmp_path / "mixed", count=40, val_every=3)
    cls = root / "train" / "d1"
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (20, 22, 3), dtype=np.uint8))
    noise.save(cls / "a.png")
    noise.convert("L").save(cls / "b.jpg", quality=90)
    noise.convert("P", palette=Image.Palette.ADAPTIVE).save(cls / "c.png")
    noise.convert("CMYK").save(cls / "d.jpg", quality=90)
    (cls / "e.jpg").write_bytes((cls / "b.jpg").read_bytes()[:100])  # truncated
    (cls / "f.jpg").write_text("not an image\n")
    torch_b, device_b = bundle(root, hflip=0.0), bundle(root, loader="device", hflip=0.0)
    (cls / "a.png").unlink()  # gone after the scan (a flaky network filesystem): skipped too
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        x, y = batches(build_loaders(device_b, 4, 0, 1, 0, 2)[0], epoch=0)  # bytes read by 2 workers
    assert device_b.num_skipped == 3 and len(x) == 32 and x.isfinite().all()
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        batches(build_loaders(torch_b, 4, 0, 1, 0, 0)[0], epoch=0)
    assert torch_b.num_skipped == 3
    assert sorted(device_b.train.base.skipped_paths) == sorted(torch_b.train.dataset.skipped_paths)
    assert {Path(p).name for p in torch_b.train.dataset.skipped_paths} == {"a.png", "e.jpg", "f.jpg"}


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing", "is not a folder; pack the ImageFolder with `prelora pack-shards SRC_ROOT OUT_DIR`"),
        ("no_index", "has no index.json: it is not a shard set written by `prelora pack-shards`"),
        ("truncated", "bytes but index.json records"),
        ("lost_shard", "listed in .*index.json is missing"),
        ("augmix", "data.loader=device runs RandAugment only"),
    ],
)
def test_bad_shards_and_device_settings_fail_before_training(shards, tmp_path, capsys, case, match):
    """The CLI's own check: exit code 2 with the message, before any process group (train.main)."""
    from prelora_ds.train import main

    root = tmp_path / "copy"
    shutil.copytree(shards, root)
    extra = []
    if case == "missing":
        root = tmp_path / "nowhere"
    elif case == "no_index":
        (root / "index.json").unlink()
    elif case == "truncated":
        data = (root / "train-000001.tar").read_bytes()
        (root / "train-000001.tar").write_bytes(data[: len(data) // 2])
    elif case == "lost_shard":
        (root / "val-000000.tar").unlink()
    else:
        extra = ["--data.loader", "device", "--data.auto_augment", "augmix-m5"]
    args = ["--recipe", "recipes/demo.yaml", "--data.dataset", "shards", "--data.root", str(root), *extra,
            "--output_dir", str(tmp_path / "run")]
    assert main(args) == 2
    assert re.search(match, capsys.readouterr().err)


def test_device_loader_config_errors():
    with pytest.raises(ConfigError, match="data.loader=device decodes image files, but data.dataset='digits'"):
        DataConfig(loader="device")
    with pytest.raises(ConfigError, match="data.loader='dali' is unknown; write one of torch, device"):
        DataConfig(loader="dali")
    with pytest.raises(ConfigError, match="data.dataset=shards needs data.root"):
        DataConfig(dataset="shards")
    from prelora_ds.data.device_input import rand_augment_args

    # (num_ops, magnitude): timm's default of 2 ops, and its clip of the magnitude at 10 (the ViT-L recipe's m15)
    assert rand_augment_args("rand-m9-mstd0.5-inc1") == (2, 9)
    assert rand_augment_args("rand-m15-n2-mstd0.5") == (2, 10)
    assert rand_augment_args("rand-n3-m5") == (3, 5)
    with pytest.raises(ConfigError, match="mmax"):
        rand_augment_args("rand-m15-mmax20")


def test_bench_data_paths_run_on_imagenet_like_jpegs(tmp_path):
    """tools/bench_data.py's images look like ImageNet's (sizes, ~100 kB) and each of its CPU paths runs."""
    from prelora_ds.testing.harness import REPO, load_tool

    bench = load_tool("bench_data")
    sizes = bench.write_images(tmp_path / "folder", 20)
    assert 60_000 < np.mean(sizes) < 160_000, sizes
    write_shards(tmp_path / "folder", tmp_path / "shards", log=lambda s: None)
    write_shards(tmp_path / "folder", tmp_path / "shards256", resize_shorter=256, quality=90, log=lambda s: None)
    recipe = str(REPO / "recipes" / "vit_l_exp2.yaml")
    for _, path, source, _ in bench.PATHS:
        if path != "dali":
            out = bench._make_step(path, source, tmp_path, recipe, "cpu", 2)([0, 3])
            assert len(out) == 2
