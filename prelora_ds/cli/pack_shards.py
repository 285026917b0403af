"""Pack an ImageFolder (train/ and val/, one folder per class) into tar shards for `data.dataset: shards`.

  prelora pack-shards /datasets/imagenet /datasets/imagenet_shards --workers 16
  prelora pack-shards /datasets/imagenet /datasets/imagenet_256 --resize-shorter 256 --quality 90 --workers 16

Then train with `--data.dataset shards --data.root OUT_DIR` (either loader). Without --resize-shorter and
--quality the shards hold each file's own bytes: the same images, in the same order, as the ImageFolder (a run
can move from the folder to its shards at a --resume). --resize-shorter S scales every image whose shorter side
is above S down to S and re-encodes it as JPEG (--quality, default 90): ImageNet's JPEGs shrink to about a third
and decode about twice as fast (docs/data.md has the measurements); the images are then not the originals, as
with any pre-resized ImageNet copy, so the crops of RandomResizedCrop see a 256-pixel image.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prelora_ds.cli import CommandError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="prelora pack-shards", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("src", help="ImageFolder root with train/ and val/")
    parser.add_argument("out", help="output folder (index.json, *.index.npy, train-*.tar, val-*.tar)")
    parser.add_argument("--shard-size", type=int, default=1000, help="images per shard (ImageNet: about 110 MB)")
    parser.add_argument("--resize-shorter", type=int, help="scale images down to this shorter side (e.g. 256)")
    parser.add_argument("--quality", type=int, help="JPEG quality when re-encoding (default 90 with --resize-shorter)")
    parser.add_argument("--workers", type=int, default=1, help="processes writing shards in parallel")
    args = parser.parse_args(argv)

    from prelora_ds.data.shards import write_shards
    from prelora_ds.errors import ConfigError

    if args.shard_size < 1 or args.workers < 1:
        parser.error("--shard-size and --workers must be >= 1")
    if args.resize_shorter is not None and args.resize_shorter < 1:
        parser.error("--resize-shorter must be >= 1")
    if args.quality is not None and not 1 <= args.quality <= 100:
        parser.error("--quality must be in 1..100")
    if not Path(args.src).is_dir():
        parser.error(f"{args.src} is not a folder; pass an ImageFolder root holding train/ and val/")
    try:
        index = write_shards(args.src, args.out, args.shard_size, args.resize_shorter,
                             args.quality if args.quality or not args.resize_shorter else 90, args.workers)
    except ConfigError as exc:
        raise CommandError(str(exc)) from exc
    for split, info in index["splits"].items():
        print(f"{split}: {info['num_samples']} images, {len(info['shards'])} shards, {info['bytes'] / 2**20:.1f} MiB")
    print(f"train with: --data.dataset shards --data.root {args.out}")
    return 0
