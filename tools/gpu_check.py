"""The product on one machine, end to end, through the real `deepspeed` launcher (the first part of gpu_check.sh).

  python tools/gpu_check.py                                 # one GPU: ViT-S/16, 224 px, bf16; writes runs/gpu_check/
  python tools/gpu_check.py --out /tmp/gc --model vit_tiny_patch16_224 \\
      --model-kwargs '{patch_size: 4, depth: 4, embed_dim: 64, num_heads: 2}' --img-size 32 \\
      --ds-config ds_configs/cpu_zero2_fp32.json --num-gpus 2 --loss-tol 1e-4        # the same on 2 CPU ranks

Writes an ImageFolder on the spot (scikit-learn's embedded digits as JPEGs at --img-size, the model's input size:
real images, no download), then runs `prelora-train` on it twice with short windows through full -> warmup -> lora: once
uninterrupted, once SIGKILLed in `warmup` (PRELORA_FAULTS) and continued with --resume. Checks: the phases,
the resumed losses against the uninterrupted ones (--loss-tol), and the merged export loaded by
`timm.create_model(...).load_state_dict` scoring the val set like the run's last validation. Writes
OUT/product.json and OUT/product.md beside the runs (OUT/ref, OUT/cut; --out, default runs/gpu_check in the
checkout); exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from prelora_ds.cli import HelpFormatter
from prelora_ds.testing.harness import deepspeed_cmd

ROOT = Path(__file__).resolve().parents[1]


def write_imagefolder(root: Path, img_size: int) -> tuple[int, int]:
    """The digits' stratified split as RGB JPEGs under root/{train,val}/<class>/; returns (train, val) counts."""
    from PIL import Image

    from prelora_ds.config.sections import DataConfig
    from prelora_ds.data.datasets import _digits_split

    x_tr, y_tr, x_va, y_va = _digits_split(DataConfig(), seed=0)
    for split, xs, ys in (("train", x_tr, y_tr), ("val", x_va, y_va)):
        for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
            folder = root / split / str(int(y))
            folder.mkdir(parents=True, exist_ok=True)
            img = Image.fromarray(x).convert("RGB").resize((img_size, img_size), Image.BILINEAR)
            img.save(folder / f"{i:05d}.jpg", quality=90)
    return len(x_tr), len(x_va)


def train_cmd(args, out: Path, data: Path) -> list[str]:
    return deepspeed_cmd(
        "--recipe", "recipes/demo.yaml", "--output_dir", str(out), "--deepspeed_config", args.ds_config,
        "--data.dataset", "imagefolder", "--data.root", str(data), "--data.num_workers", str(args.workers),
        "--data.loader", args.loader,
        "--model.name", args.model, "--model.kwargs", args.model_kwargs,
        "--train.epochs", "1000", "--train.max_steps", str(args.steps), "--train.log_every_steps", "1",
        "--train.lr_warmup_steps", "5", "--prelora.window_steps", str(args.window), "--prelora.num_windows", "3",
        "--prelora.delta_w", "1000", "--prelora.delta_l", "1000", "--prelora.warmup_steps", str(2 * args.window),
        ranks=args.num_gpus,
    )  # fmt: skip


def run(cmd: list[str], log: Path, faults: str | None = None) -> tuple[int, float]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if faults:
        env["PRELORA_FAULTS"] = faults
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    return rc, time.perf_counter() - t0


def losses(run_dir: Path) -> dict[int, float]:
    """The training loss by step over every event file (a later file wins a step)."""
    from prelora_ds.metrics.readers import scalars
    from prelora_ds.metrics.tags import tag

    return dict(scalars(run_dir, tag("loss")).get(tag("loss"), []))


def export_top1(run_dir: Path, data: Path, model_name: str, model_kwargs: dict) -> float:
    """Top-1 of model_merged.safetensors in a plain timm model, fp32, on the val split with the run's val transform."""
    import timm
    import torch
    from safetensors.torch import load_file

    from prelora_ds.config.sections import DataConfig
    from prelora_ds.data.datasets import build_datasets
    from prelora_ds.engine.model import input_spec

    model = timm.create_model(model_name, pretrained=False, num_classes=10, **model_kwargs)
    model.load_state_dict(load_file(str(run_dir / "model_merged.safetensors")))  # strict: a plain timm state dict
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device).eval()
    img, chans, mean, std = input_spec(model)
    val = build_datasets(DataConfig(dataset="imagefolder", root=str(data)), img, chans, mean=mean, std=std).val
    loader = torch.utils.data.DataLoader(val, batch_size=256)
    hit = n = 0
    with torch.no_grad():
        for x, y in loader:
            hit += int((model(x.to(device)).argmax(1).cpu() == y).sum())
            n += len(y)
    return 100 * hit / n


def sized_kwargs(text: str, img_size: int) -> dict:
    """The model's timm kwargs: the --model-kwargs mapping with img_size set to --img-size (the JPEGs' size)."""
    try:
        kwargs = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"--model-kwargs is not YAML: {exc}") from exc
    if not isinstance(kwargs, dict):
        raise ValueError(f"--model-kwargs must be a YAML mapping, got {text!r}")
    if kwargs.setdefault("img_size", img_size) != img_size:
        raise ValueError(f"--model-kwargs img_size {kwargs['img_size']} differs from --img-size {img_size}: "
                         "--img-size sizes both the model and the images; leave img_size out of --model-kwargs")
    return kwargs


def jpeg_size(data: Path) -> int | None:
    """The side in px of the JPEGs an earlier check wrote under `data` (None: none there)."""
    from PIL import Image

    first = next((data / "val").rglob("*.jpg"), None) if (data / "val").is_dir() else None
    if first is None:
        return None
    with Image.open(first) as img:
        return img.size[0]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    p.add_argument("--out", type=Path, help="folder of the data, the two runs (ref/, cut/) and their logs, "
                   "product.json and product.md (default: runs/gpu_check in the checkout)")
    p.add_argument("--model", default="vit_small_patch16_224", help="timm model name (model.name)")
    p.add_argument("--model-kwargs", default="{}",
                   help="YAML mapping for timm.create_model (model.kwargs); img_size comes from --img-size")
    p.add_argument("--img-size", type=int, default=224,
                   help="image side in px: sizes the model (model.kwargs img_size) and the JPEGs written")
    p.add_argument("--ds-config", default="ds_configs/gpu_single_bf16.json",
                   help="DeepSpeed config; a relative path is in the checkout")
    p.add_argument("--num-gpus", type=int, default=1, help="ranks the deepspeed launcher starts (GPUs, or CPU ranks)")
    p.add_argument("--workers", type=int, default=4, help="data.num_workers: DataLoader workers per rank")
    p.add_argument("--loader", default="torch", choices=["torch", "device"],
                   help="data.loader: device decodes (nvJPEG) and augments on the GPU (docs/data.md)")
    p.add_argument("--steps", type=int, default=80, help="train.max_steps of each run")
    p.add_argument("--window", type=int, default=8, help="prelora.window_steps: switch after 3 windows")
    p.add_argument("--loss-tol", type=float, default=2e-2, help="resumed vs uninterrupted loss (bf16: 2**-7 x ~2.3)")
    p.add_argument("--top1-tol", type=float, default=2.0, help="export (fp32) vs the run's last validation, points")
    args = p.parse_args()
    try:
        kwargs = sized_kwargs(args.model_kwargs, args.img_size)
    except ValueError as exc:
        p.error(str(exc))
    args.model_kwargs = json.dumps(kwargs)  # JSON is YAML: --model.kwargs reads it as the mapping
    out = (args.out or ROOT / "runs" / "gpu_check").resolve()
    shutil.rmtree(out / "ref", ignore_errors=True)
    shutil.rmtree(out / "cut", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    if jpeg_size(data) != args.img_size:  # none there yet, or written at another --img-size
        shutil.rmtree(data, ignore_errors=True)
        n_train, n_val = write_imagefolder(data, args.img_size)
        print(f"wrote {n_train} train / {n_val} val JPEGs at {args.img_size} px under {data}", flush=True)

    switch, warm = 3 * args.window, 2 * args.window
    kill_at = switch + args.window  # inside warmup, after the switch's checkpoint
    res: dict = {"model": args.model, "img_size": args.img_size, "ds_config": args.ds_config, "loader": args.loader,
                 "num_gpus": args.num_gpus, "steps": args.steps, "kill_at": kill_at}
    rc, res["ref_s"] = run(train_cmd(args, out / "ref", data), out / "ref.log")
    res["ref_rc"] = rc
    rc, res["killed_s"] = run(train_cmd(args, out / "cut", data), out / "cut_killed.log", f"kill@{kill_at}:0")
    res["killed_rc"] = rc
    rc, res["resumed_s"] = run([*train_cmd(args, out / "cut", data), "--resume"], out / "cut_resumed.log")
    res["resumed_rc"] = rc

    checks: dict[str, bool] = {"reference ran": res["ref_rc"] == 0, "kill stopped the job": res["killed_rc"] != 0,
                               "resume ran": res["resumed_rc"] == 0}
    if res["ref_rc"] == 0 and res["resumed_rc"] == 0:
        ref = json.loads((out / "ref" / "summary.json").read_text())
        cut = json.loads((out / "cut" / "summary.json").read_text())
        res["phases"] = [(ph["name"], ph["start_step"], ph["end_step"]) for ph in cut["phases"]]
        res["median_step_s"] = {ph["name"]: ph["median_step_s"] for ph in ref["phases"]}
        res["peak_memory_bytes"] = {ph["name"]: ph.get("peak_memory_bytes") for ph in ref["phases"]}
        res["trainable_params"] = {ph["name"]: ph["trainable_params"] for ph in ref["phases"]}
        a, b = losses(out / "ref"), losses(out / "cut")
        common = sorted(set(a) & set(b))
        res["loss_worst_diff"] = max(abs(a[s] - b[s]) for s in common) if common else None
        res["final_val_top1"] = cut["final_val_top1"]
        res["export_top1"] = export_top1(out / "cut", data, args.model, kwargs)
        checks["phases full -> warmup -> lora"] = [n for n, _, _ in res["phases"]] == ["full", "warmup", "lora"] and (
            res["phases"][1][1] == switch and res["phases"][2][1] == switch + warm
        )
        checks[f"losses after --resume within {args.loss_tol:g}"] = (
            len(common) == args.steps and res["loss_worst_diff"] <= args.loss_tol
        )
        checks[f"export loads into timm, top-1 within {args.top1_tol:g}"] = (
            abs(res["export_top1"] - res["final_val_top1"]) <= args.top1_tol
        )
    res["checks"] = checks
    (out / "product.json").write_text(json.dumps(res, indent=1))
    lines = ["| check | result |", "|---|---|", *(f"| {k} | {'ok' if v else 'FAILED'} |" for k, v in checks.items())]
    for key in ("phases", "median_step_s", "peak_memory_bytes", "trainable_params", "loss_worst_diff",
                "final_val_top1", "export_top1", "ref_s", "resumed_s"):
        if key in res:
            lines.append(f"| {key} | {res[key]} |")
    (out / "product.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
