"""The product on one machine, end to end, through the real `deepspeed` launcher (the first part of gpu_check.sh).

  python tools/gpu_check.py --out runs/gpu_check                                   # one GPU: ViT-S/16, 224 px, bf16
  python tools/gpu_check.py --out /tmp/gc --model vit_tiny_patch16_224 \\
      --model-kwargs '{img_size: 32, patch_size: 4, depth: 4, embed_dim: 64, num_heads: 2}' --img-size 32 \\
      --ds-config ds_configs/cpu_zero2_fp32.json --num-gpus 2 --loss-tol 1e-4        # the same on 2 CPU ranks

Writes an ImageFolder on the spot (scikit-learn's embedded digits as JPEGs at --img-size: real images, no
download), then runs `prelora-train` on it twice with short windows through full -> warmup -> lora: once
uninterrupted, once SIGKILLed in `warmup` (PRELORA_FAULTS) and continued with --resume. Checks: the phases,
the resumed losses against the uninterrupted ones (--loss-tol), and the merged export loaded by
`timm.create_model(...).load_state_dict` scoring the val set like the run's last validation. Writes
OUT/product.json and OUT/product.md; exits 1 when a check fails.
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--model-kwargs", default="{}", help="YAML mapping for timm.create_model")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--ds-config", default="ds_configs/gpu_single_bf16.json")
    p.add_argument("--num-gpus", type=int, default=1)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--loader", default="torch", choices=["torch", "device"],
                   help="data.loader: device decodes (nvJPEG) and augments on the GPU (docs/data.md)")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--window", type=int, default=8, help="prelora.window_steps: switch after 3 windows")
    p.add_argument("--loss-tol", type=float, default=2e-2, help="resumed vs uninterrupted loss (bf16: 2**-7 x ~2.3)")
    p.add_argument("--top1-tol", type=float, default=2.0, help="export (fp32) vs the run's last validation, points")
    args = p.parse_args()
    out = args.out.resolve()
    shutil.rmtree(out / "ref", ignore_errors=True)
    shutil.rmtree(out / "cut", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    if not (data / "val").is_dir():
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
        kwargs = yaml.safe_load(args.model_kwargs) or {}
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
