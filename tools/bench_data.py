"""How fast each input path turns ImageNet-like JPEGs into training tensors, and how many cores a GPU needs.

  python tools/bench_data.py --out docs/bench_data_cpu.json > docs/bench_data_cpu.md
  python tools/bench_data.py --device cuda --gpu-images-per-s 1400 3600     # on a GPU node (tools/gpu_check.sh)

It writes `--images` JPEGs like ImageNet's on the spot (500x375 / 375x500 / 500x333..., quality 90-96, about
110 kB, content with ImageNet-like frequency falloff), packs them into shards twice (as they are, and resized to a
shorter side of 256 at quality 90, as `prelora pack-shards` does), then times every input path with the
train transform of `--recipe` (default: the ViT-L recipe's RandomResizedCrop 224 + flip + RandAugment n2 m15):

  torch            PIL decode + timm transform, what one DataLoader worker of `data.loader: torch` does
  device (cpu)     torchvision decode + v2 transforms of `data.loader: device`, run on the CPU
  device (cuda)    the same on the GPU (nvJPEG + v2 on CUDA tensors; host work: reading bytes, launching)
  dali (cpu/gpu)   NVIDIA DALI: decoders.image + random_resized_crop + flip + auto_aug.rand_augment, when
                   nvidia-dali is importable (it is not a dependency of the package)

each on files, on full-size shards and on shards resized to 256. Per path: images/s of one process (one
worker), images/s of N processes side by side (`--procs`), host CPU seconds per image (process time, all
threads), and cores per GPU = GPU images/s x CPU seconds per image for each `--gpu-images-per-s`: the cores a
node needs per GPU so that input keeps up with a model that takes that many images/s.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from prelora_ds.cli import HelpFormatter

ROOT = Path(__file__).resolve().parents[1]
SIZES = [(500, 375), (500, 333), (375, 500), (500, 400), (640, 480), (400, 300), (333, 500), (500, 500)]


# --------------------------------------------------------------------------------------------------------------------
# ImageNet-like JPEGs
# --------------------------------------------------------------------------------------------------------------------


def natural_image(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Noise with a 1/f amplitude falloff (as photographs have), plus a little sensor grain."""
    from PIL import Image

    acc = np.zeros((h, w, 3), dtype=np.float32)
    for octave in range(1, 9):
        cells = 2**octave
        small = rng.normal(size=(max(1, cells * h // w), cells, 3)).astype(np.float32)
        up = np.stack([np.asarray(Image.fromarray(small[..., c]).resize((w, h), Image.Resampling.BICUBIC))
                       for c in range(3)], axis=-1)
        acc += up / octave**0.6
    acc += rng.normal(scale=0.2, size=acc.shape).astype(np.float32)
    acc = (acc - acc.mean()) / (acc.std() + 1e-6)
    return np.clip(128 + 55 * acc, 0, 255).astype(np.uint8)


def write_images(root: Path, n: int, seed: int = 0, classes: int = 4) -> list[int]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    sizes = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        path = root / ("val" if i % 5 == 4 else "train") / f"c{i % classes}" / f"{i:06d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(natural_image(rng, w, h)).save(path, quality=int(rng.integers(90, 97)))
        sizes.append(path.stat().st_size)
    return sizes


# --------------------------------------------------------------------------------------------------------------------
# The paths (each runs in a fresh process with one torch thread: one DataLoader worker's view)
# --------------------------------------------------------------------------------------------------------------------


def _source(kind: str, workdir: Path):
    from prelora_ds.data.images import RobustImageFolder
    from prelora_ds.data.shards import ShardDataset

    if kind == "files":
        return RobustImageFolder(workdir / "folder" / "train")
    return ShardDataset(workdir / kind, "train")


def _make_step(path: str, source: str, workdir: Path, recipe: str, device: str, batch: int):
    """A function that processes one batch of indices; the set-up (transforms, pipelines) is not timed."""
    import torch

    from prelora_ds.config.recipe import load_recipe
    from prelora_ds.data.datasets import build_transforms

    cfg = load_recipe(recipe, {"data.root": str(workdir / "folder")}).data
    ds = _source(source, workdir)
    mean = std = (0.5, 0.5, 0.5)  # ViT-L's; the cost does not depend on them
    if path == "torch":
        train_tf, _ = build_transforms(cfg, 224, 3, mean, std)
        ds.transform = train_tf
        return lambda idx: [ds[i] for i in idx]
    if path == "pil-decode":
        from prelora_ds.data.images import load_image

        return lambda idx: [load_image(__import__("io").BytesIO(ds.read_bytes(i))) for i in idx]
    if path == "read":
        return lambda idx: [ds.read_bytes(i) for i in idx]
    if path == "device":
        from prelora_ds.data.device_input import DeviceImages, build_device_transforms

        train_tf, _ = build_device_transforms(cfg, 224, 3, mean, std)
        images = DeviceImages(ds, train_tf, mean, std, 3, seed=0)
        dev = torch.device(device)

        def step(idx):
            items = [images[i] for i in idx]
            out, _ = images.prepare([d for d, _, _ in items], torch.tensor([t for _, t, _ in items]), idx, dev)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            return out

        return step
    if path == "dali":
        return _dali_step(ds, cfg, device, batch)
    raise ValueError(path)


def _dali_step(ds, cfg, device: str, batch: int):
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.auto_aug import rand_augment

    from prelora_ds.data.device_input import rand_augment_args

    num_ops, magnitude = rand_augment_args(cfg.auto_augment)
    pending: list[list[int]] = []

    def source():
        return [np.frombuffer(ds.read_bytes(i), dtype=np.uint8) for i in pending.pop(0)]

    gpu = device == "cuda"

    @pipeline_def(batch_size=batch, num_threads=1, device_id=0 if gpu else None, seed=0, enable_conditionals=True,
                  prefetch_queue_depth=1, exec_async=False, exec_pipelined=False)
    def pipe():
        enc = fn.external_source(source=source, batch=True)
        img = fn.decoders.image(enc, device="mixed" if gpu else "cpu", output_type=types.RGB)
        img = fn.random_resized_crop(img, size=(224, 224), random_area=tuple(cfg.scale))
        img = fn.flip(img, horizontal=fn.random.coin_flip(probability=cfg.hflip))
        img = rand_augment.rand_augment(img, n=num_ops, m=magnitude)
        return fn.crop_mirror_normalize(img, dtype=types.FLOAT, output_layout="CHW", mean=[127.5] * 3,
                                        std=[127.5] * 3)

    p = pipe()
    p.build()

    def step(idx):
        pending.append(list(idx))
        return p.run()

    return step


def _worker(args, barrier, results) -> None:
    path, source, workdir, recipe, device, batch, seconds, offset = args
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    step = _make_step(path, source, Path(workdir), recipe, device, batch)
    n = len(_source(source, Path(workdir)))
    rng = np.random.default_rng(offset)

    def batch_idx():
        return [int(i) for i in rng.integers(0, n, size=batch)]

    step(batch_idx())  # warm-up (first-call costs, caches)
    barrier.wait()  # every process of a count starts timing together
    images, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        step(batch_idx())
        images += batch
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    results.put({"images": images, "wall_s": wall, "cpu_s": cpu})


def measure(path: str, source: str, workdir: Path, args, procs: int) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(procs), ctx.Queue()
    workers = [
        ctx.Process(target=_worker, args=((path, source, str(workdir), args.recipe, args.device, args.batch,
                                           args.seconds, k), barrier, queue))
        for k in range(procs)
    ]
    for w in workers:
        w.start()
    results = [queue.get(timeout=600) for _ in workers]
    for w in workers:
        w.join()
    images = sum(r["images"] for r in results)
    return {
        "images_per_s": sum(r["images"] / r["wall_s"] for r in results),
        "cpu_s_per_image": sum(r["cpu_s"] for r in results) / images,
    }


PATHS = [  # (name in the table, path, source, what the host does per image)
    ("torch, files", "torch", "files", "PIL decode + timm transform"),
    ("torch, shards", "torch", "shards", "the same, read from a shard"),
    ("torch, shards 256", "torch", "shards256", "the same on images resized to 256"),
    ("PIL decode only, files", "pil-decode", "files", "decode, no transform"),
    ("PIL decode only, shards 256", "pil-decode", "shards256", "decode, no transform"),
    ("device, files", "device", "files", "{dev}: torchvision decode + v2 transforms"),
    ("device, shards 256", "device", "shards256", "{dev}: the same on images resized to 256"),
    ("device read only, files", "read", "files", "what a device-path worker does"),
    ("device read only, shards", "read", "shards", "what a device-path worker does"),
    ("dali, files", "dali", "files", "{dev}: DALI decode + augmentations"),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument("--images", type=int, default=240, help="ImageNet-like JPEGs to write (every fifth in val/)")
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="process counts to measure")
    parser.add_argument("--seconds", type=float, default=5.0, help="timed seconds per measurement")
    parser.add_argument("--batch", type=int, default=16, help="images per timed batch")
    parser.add_argument("--device", default="cpu", help="where the device and dali paths run: cpu or cuda")
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "vit_l_exp2.yaml"),
                        help="recipe whose data section gives the train transform")
    parser.add_argument("--gpu-images-per-s", type=float, nargs="+", default=[700.0, 2100.0],
                        help="training images/s of one GPU (tools/gpu_check.sh measures them): full, lora, ...")
    parser.add_argument("--paths", nargs="*", help="only these table rows, names as printed (default: every row)")
    parser.add_argument("--workdir", help="keep the images and shards here, and reuse them when they are there "
                        "(default: a temporary folder, removed at the end)")
    parser.add_argument("--out", help="also write the JSON result to this file (default: printed only, the "
                        "markdown table on stdout)")
    args = parser.parse_args(argv)

    from prelora_ds.data.shards import write_shards

    tmp = tempfile.TemporaryDirectory() if not args.workdir else None
    workdir = Path(args.workdir or tmp.name)
    load_before = os.getloadavg()
    if not (workdir / "folder").is_dir():
        sizes = write_images(workdir / "folder", args.images)
        write_shards(workdir / "folder", workdir / "shards", shard_size=100, log=lambda s: None)
        write_shards(workdir / "folder", workdir / "shards256", shard_size=100, resize_shorter=256, quality=90,
                     log=lambda s: None)
    else:
        sizes = [p.stat().st_size for p in (workdir / "folder").rglob("*.JPEG")]
    shard_kb = json.loads((workdir / "shards256" / "index.json").read_text())["splits"]["train"]
    try:
        import nvidia.dali  # noqa: F401

        have_dali = True
    except ImportError:
        have_dali = False
    rows = []
    for name, path, source, what in PATHS:
        if args.paths and name not in args.paths:
            continue
        if path == "dali" and not have_dali:
            print(f"skipping {name}: nvidia-dali is not installed", file=sys.stderr)
            continue
        row = {"path": name, "host_work": what.format(dev=args.device)}
        for procs in args.procs:
            m = measure(path, source, workdir, args, procs)
            row[f"images_per_s_{procs}"] = m["images_per_s"]
            row[f"cpu_s_per_image_{procs}"] = m["cpu_s_per_image"]
            print(f"{name}: {procs} process(es): {m['images_per_s']:.1f} images/s, "
                  f"{1000 * m['cpu_s_per_image']:.2f} CPU ms/image", file=sys.stderr, flush=True)
        rows.append(row)
    result = {
        "device": args.device,
        "recipe": args.recipe,
        "images": len(sizes),
        "jpeg_kb_mean": float(np.mean(sizes) / 1024),
        "shard256_kb_mean": shard_kb["bytes"] / shard_kb["num_samples"] / 1024,
        "gpu_images_per_s": args.gpu_images_per_s,
        "procs": args.procs,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        "rows": rows,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(table(result))
    if tmp:
        tmp.cleanup()
    return 0


def table(result: dict) -> str:
    procs, gpus = result["procs"], result["gpu_images_per_s"]
    head = (["path", "host work per image"] + [f"images/s, {p} proc" for p in procs] + ["CPU ms/image"]
            + [f"cores/GPU at {g:.0f} img/s" for g in gpus])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        cpu = r[f"cpu_s_per_image_{procs[0]}"]
        cells = [r["path"], r["host_work"]] + [f"{r[f'images_per_s_{p}']:.1f}" for p in procs]
        cells += [f"{1000 * cpu:.2f}"] + [f"{math.ceil(10 * g * cpu) / 10:.1f}" for g in gpus]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"{result['images']} JPEGs of {result['jpeg_kb_mean']:.0f} kB on average (resized to 256: "
                 f"{result['shard256_kb_mean']:.0f} kB); load average before {result['load_before'][0]:.2f}, "
                 f"after {result['load_after'][0]:.2f}, {result['cpu_count']} cores.")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
