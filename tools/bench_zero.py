"""Memory per rank of each PreLoRA phase under ZeRO-2 and ZeRO-3, on N ranks: when to pick which stage.

  python tools/bench_zero.py --model vit_huge_patch14_224 --img-size 112 --ranks 2 --out zero.json

For every (ZeRO config, phase) one job runs `deepspeed --num_gpus N tools/bench_zero.py --worker ...`: the
package's own Trainer starts in the phase (LoRA rank --rank on every target layer), takes --steps optimizer
steps on synthetic images, and each rank reports its peak memory (peak RSS on CPU, max_memory_allocated on
GPU) and its time per step. One job per cell, so no cell inherits another's peak. Prints a markdown table
with the stage-3 / stage-2 ratio per phase, all from this one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from prelora_ds.cli import HelpFormatter
from prelora_ds.testing.harness import deepspeed_cmd, run_ranked

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"zero2": "ds_configs/cpu_zero2_fp32.json", "zero3": "ds_configs/cpu_zero3_fp32.json"}
GPU_CONFIGS = {"zero2": "ds_configs/vit_large_zero2_a100_64.json", "zero3": "ds_configs/vit_huge_zero3_a100_64.json"}


def worker(args: argparse.Namespace) -> None:
    import torch

    from prelora_ds.config.sections import ModelConfig, PreLoRAConfig
    from prelora_ds.engine.model import create_model
    from prelora_ds.lora.inject import target_layers
    from prelora_ds.metrics.recorder import memory_bytes, reset_peak_memory
    from prelora_ds.testing.harness import start_distributed, synthetic_trainer

    rank, _, world = start_distributed(1800)
    ranks = None
    if args.phase != "full":
        with torch.device("meta"):
            model = create_model(ModelConfig(name=args.model, kwargs={"img_size": args.img_size}), 1000, init=False)
            layers = target_layers(model, PreLoRAConfig().target_modules)
        ranks = {n: args.rank for n in layers}
    trainer = synthetic_trainer(
        Path(args.tmp) / f"{args.config_name}_{args.phase}", model=args.model, model_kwargs={"img_size": args.img_size},
        img_size=args.img_size, ds_config=ROOT / args.config,
        ds_changes={"gradient_accumulation_steps": 1, "train_batch_size": None}, micro_batch=args.batch_size,
        train_size=args.batch_size * world * (args.steps + 2), val_size=world, num_classes=1000,
        first_phase=args.phase, start_ranks=ranks,
        num_threads=None if torch.cuda.is_available() else max(1, (os.cpu_count() or 1) // world),  # ranks share cores
    )  # fmt: skip
    build_peak = memory_bytes()  # the engine build (ZeRO-3: under deepspeed.zero.Init)
    reset_peak_memory()
    batches = iter(trainer.train_loader)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = trainer.train_step([next(batches)])
        float(loss)
        times.append(time.perf_counter() - t0)
    trainable, total = trainer.phases.count_params()
    result = {"peak_memory_bytes": memory_bytes(), "build_peak_bytes": build_peak, "live_tensor_bytes": live_bytes(),
              "median_step_s": statistics.median(times[1:] or times), "trainable_params": trainable,
              "total_params": total}  # fmt: skip
    Path(args.result).with_suffix(f".rank{rank}.json").write_text(json.dumps(result))
    trainer.close()


def live_bytes(collect: bool = True) -> int:
    """Bytes of the tensors alive between steps: weights (or their partitions), gradients, optimizer state and
    DeepSpeed's buffers. On GPU `memory_allocated`; on CPU the distinct storages of every tensor Python holds (the
    same count without allocator caching, freed pages still mapped or the libraries' own heap, which make peak
    RSS blur what ZeRO partitions). `collect=False`: no garbage collection first, so tensors in unreachable cycles
    that the collector has not freed yet count too (on GPU they always do)."""
    import gc

    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.memory_allocated())
    if collect:
        gc.collect()
    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and not obj.is_meta:
            st = obj.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
    return sum(storages.values())


def run_cell(args: argparse.Namespace, name: str, config: str, phase: str) -> list[dict]:
    result = Path(args.tmp) / f"{name}_{phase}"
    cmd = deepspeed_cmd("--worker", "--config", config, "--config-name", name, "--phase", phase,
                        "--model", args.model, "--img-size", str(args.img_size), "--batch-size", str(args.batch_size),
                        "--steps", str(args.steps), "--rank", str(args.rank), "--tmp", args.tmp,
                        "--result", result, ranks=args.ranks, port=args.port, script=__file__)  # fmt: skip
    return run_ranked(cmd, result, args.ranks)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", default="vit_huge_patch14_224", help="timm model name")
    p.add_argument("--img-size", type=int, default=224,
                   help="image side in px: sizes the model (its position embedding) and the synthetic inputs")
    p.add_argument("--batch-size", type=int, default=1, help="micro batch per rank")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per cell (the first is not timed)")
    p.add_argument("--rank", type=int, default=32, help="LoRA rank on every target layer")
    p.add_argument("--ranks", type=int, default=2, help="processes (GPUs) per job")
    p.add_argument("--phases", nargs="+", default=["full", "lora"],
                   help="phases to measure, of: full, warmup, lora (default: full lora)")
    p.add_argument("--gpu", action="store_true",
                   help="the bf16 A100 configs instead of the CPU ones (default: the CPU ones)")
    p.add_argument("--port", type=int, default=None, help="the launcher's master port (default: a free one per job)")
    p.add_argument("--tmp", default="/tmp/prelora_bench_zero", help="each job's working folder and per-rank results")
    p.add_argument("--out", help="also write the JSON result (args, every cell's per-rank results) to this file "
                   "(default: printed only, the markdown table)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--config-name", help=argparse.SUPPRESS)
    p.add_argument("--phase", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args, _ = p.parse_known_args()  # the launcher appends --local_rank
    if args.worker:
        return worker(args)
    args.tmp = str(Path(args.tmp).resolve())  # the jobs run in the checkout; the results are read from here
    Path(args.tmp).mkdir(parents=True, exist_ok=True)
    cells = {}
    for name, config in (GPU_CONFIGS if args.gpu else CONFIGS).items():
        for phase in args.phases:
            cells[f"{name}/{phase}"] = run_cell(args, name, config, phase)
    gib = 2**30
    print(f"\n{args.model} at {args.img_size} px, batch {args.batch_size} per rank, {args.ranks} ranks, "
          f"LoRA rank {args.rank}: GiB per rank (max over ranks), ZeRO-2 / ZeRO-3 and their ratio")  # fmt: skip
    print("| phase | live tensors | ratio | step peak | ratio | build peak | ratio | s/step |\n"
          "|---|---|---|---|---|---|---|---|")  # fmt: skip
    for phase in args.phases:
        z2, z3 = cells[f"zero2/{phase}"], cells[f"zero3/{phase}"]
        row = [phase]
        for key in ("live_tensor_bytes", "peak_memory_bytes", "build_peak_bytes", "median_step_s"):
            a, b = max(r[key] for r in z2), max(r[key] for r in z3)
            if key == "median_step_s":
                row.append(f"{a:.1f} / {b:.1f}")
            else:
                row += [f"{a / gib:.2f} / {b / gib:.2f}", f"{b / a:.2f}"]
        print("| " + " | ".join(row) + " |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "cells": cells}, indent=1))


if __name__ == "__main__":
    main()
