"""An engine per phase, through a real switch: what the `lora` step costs when it keeps `full`'s ZeRO stage and micro
batch, and when its rebuild changes them (`engine.lora` in the recipe).

  python tools/bench_phase_engines.py --model vit_huge_patch14_224 --img-size 112 --out phases_h.json   # ViT-H cells
  python tools/bench_phase_engines.py --model vit_large_patch16_224 --img-size 112 --cells micro_x1 micro_x2 micro_x4

Each cell is one job (`deepspeed --num_gpus N tools/bench_phase_engines.py --worker ...`): the package's Trainer on
synthetic images takes --full-steps optimizer steps in `full`, switches to `lora` through `PhaseEngine.rebuild` (LoRA
rank --rank on every target layer; the fp32 masters gathered and carried as in a run) and takes --lora-steps. Every
cell has the same global batch (micro x accumulation x ranks), so images/s compare directly. Each rank reports its
peak memory (peak RSS on CPU, max_memory_allocated on GPU) in full, in the rebuild and in lora, and the tensors alive
after full's and lora's steps (bench_zero.live_bytes) and right after the rebuild (without a garbage collection, which
would free what a run keeps until Python's collector runs). Prints a markdown
table with each cell's lora step against the first cell's, all from this one run.

Cells (--micro M: full's micro batch; full accumulates --accum micro batches):
  stage2           full ZeRO-2 -> lora ZeRO-2                    (the run on stage 2 throughout)
  stage3_kept      full ZeRO-3 -> lora ZeRO-3                    (today's default when full needs stage 3)
  stage3_to_2      full ZeRO-3 -> lora ZeRO-2
  stage3_to_2_x2   full ZeRO-3 -> lora ZeRO-2, micro batch x2 (accumulation / 2)
  micro_x1/x2/x4   full ZeRO-2 -> lora ZeRO-2, micro batch x1, x2, x4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from bench_zero import live_bytes  # tools/ is the script's own directory

from prelora_ds.cli import HelpFormatter
from prelora_ds.testing.harness import deepspeed_cmd, run_ranked

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"zero2": "ds_configs/cpu_zero2_fp32.json", "zero3": "ds_configs/cpu_zero3_fp32.json"}
GPU_CONFIGS = {"zero2": "ds_configs/vit_large_zero2_a100_64.json", "zero3": "ds_configs/vit_huge_zero3_a100_64.json"}
# cell -> (full's ZeRO config, lora's engine settings as a function of full's micro batch)
CELLS = {
    "stage2": ("zero2", lambda m: {}),
    "stage3_kept": ("zero3", lambda m: {}),
    "stage3_to_2": ("zero3", lambda m: {"zero_stage": 2}),
    "stage3_to_2_x2": ("zero3", lambda m: {"zero_stage": 2, "micro_batch": 2 * m}),
    "micro_x1": ("zero2", lambda m: {}),
    "micro_x2": ("zero2", lambda m: {"micro_batch": 2 * m}),
    "micro_x4": ("zero2", lambda m: {"micro_batch": 4 * m}),
}


def worker(args: argparse.Namespace) -> None:
    import torch

    from prelora_ds.metrics.recorder import memory_bytes, reset_peak_memory
    from prelora_ds.testing.harness import start_distributed, synthetic_trainer

    rank, _, world = start_distributed(3600)
    config, lora = CELLS[args.cell]
    settings = lora(args.micro)
    global_batch = args.micro * args.accum * world
    steps = args.full_steps + args.lora_steps + 2
    trainer = synthetic_trainer(
        Path(args.tmp) / args.cell, model=args.model, model_kwargs={"img_size": args.img_size},
        img_size=args.img_size, ds_config=ROOT / (GPU_CONFIGS if args.gpu else CONFIGS)[config],
        micro_batch=args.micro, global_batch=global_batch, train_size=global_batch * steps, val_size=world,
        num_classes=1000, engine={"lora": settings},
        num_threads=None if torch.cuda.is_available() else max(1, (os.cpu_count() or 1) // world),  # ranks share cores
    )  # fmt: skip

    def timed_steps(n: int) -> list[float]:
        times, group = [], []
        for batch in trainer.train_loader:
            group.append(batch)
            if len(group) == trainer.geometry.accum:
                t0 = time.perf_counter()
                float(trainer.train_step(group))
                times.append(time.perf_counter() - t0)
                group = []
                if len(times) == n:
                    break
        return times

    reset_peak_memory()
    full_times = timed_steps(args.full_steps)
    full_peak, full_live = memory_bytes(), live_bytes()
    ranks = {name: args.rank for name in trainer.phases.layout.layers}
    reset_peak_memory()
    t0 = time.perf_counter()
    trainer.state.start_phase("lora", ranks, trainer.state.step)
    trainer.phases.rebuild("lora", ranks, trainer.state.step)
    trainer._regroup()  # the lora engine's micro batch: a new loader, the same images per step
    rebuild_s, rebuild_peak = time.perf_counter() - t0, memory_bytes()
    # no collection here: what the rebuild left uncollected counts, and stays for the lora peak as in a run
    rebuild_live = live_bytes(collect=False)
    reset_peak_memory()
    lora_times = timed_steps(args.lora_steps)
    trainable, total = trainer.phases.count_params()
    result = {"full_step_s": statistics.median(full_times[1:] or full_times), "full_peak_bytes": full_peak,
              "rebuild_s": rebuild_s, "rebuild_peak_bytes": rebuild_peak,
              "lora_step_s": statistics.median(lora_times[1:] or lora_times), "lora_peak_bytes": memory_bytes(),
              "full_live_bytes": full_live, "rebuild_live_bytes": rebuild_live, "lora_live_bytes": live_bytes(),
              "lora_micro": trainer.geometry.micro, "lora_accum": trainer.geometry.accum, "global_batch": global_batch,
              "lora_settings": settings, "trainable_params": trainable, "total_params": total}  # fmt: skip
    Path(args.result).with_suffix(f".rank{rank}.json").write_text(json.dumps(result))
    trainer.close()


def run_cell(args: argparse.Namespace, cell: str) -> list[dict]:
    result = Path(args.tmp) / cell
    cmd = deepspeed_cmd("--worker", "--cell", cell, "--model", args.model, "--img-size", str(args.img_size),
                        "--micro", str(args.micro), "--accum", str(args.accum), "--full-steps", str(args.full_steps),
                        "--lora-steps", str(args.lora_steps), "--rank", str(args.rank), "--tmp", args.tmp,
                        "--result", result, *(["--gpu"] if args.gpu else []), ranks=args.ranks, script=__file__)
    return run_ranked(cmd, result, args.ranks)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", default="vit_huge_patch14_224", help="timm model name")
    p.add_argument("--img-size", type=int, default=224,
                   help="image side in px: sizes the model (its position embedding) and the synthetic inputs")
    p.add_argument("--micro", type=int, default=2, help="full's micro batch per rank")
    p.add_argument("--accum", type=int, default=4, help="full's accumulation (the x2/x4 cells need 2/4 or more)")
    p.add_argument("--full-steps", type=int, default=2, help="optimizer steps in full, before the switch")
    p.add_argument("--lora-steps", type=int, default=4, help="optimizer steps in lora, after the switch")
    p.add_argument("--rank", type=int, default=32, help="LoRA rank on every target layer")
    p.add_argument("--ranks", type=int, default=2, help="processes (GPUs) per job")
    default_cells = ["stage2", "stage3_kept", "stage3_to_2", "stage3_to_2_x2"]
    p.add_argument("--cells", nargs="+", default=default_cells, choices=list(CELLS), metavar="CELL",
                   help=f"cells to run, of: {', '.join(CELLS)} (default: {' '.join(default_cells)})")
    p.add_argument("--gpu", action="store_true",
                   help="the bf16 A100 configs instead of the CPU ones (default: the CPU ones)")
    p.add_argument("--tmp", default="/tmp/prelora_bench_phases", help="each job's working folder and per-rank results")
    p.add_argument("--out", help="also write the JSON result (args, every cell's per-rank results) to this file "
                   "(default: printed only, the markdown table)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--cell", "--result"):  # what the driver passes to each job's worker
        p.add_argument(hidden, help=argparse.SUPPRESS)
    args, _ = p.parse_known_args()  # the launcher appends --local_rank
    if args.worker:
        return worker(args)
    args.tmp = str(Path(args.tmp).resolve())  # the jobs run in the checkout; the results are read from here
    Path(args.tmp).mkdir(parents=True, exist_ok=True)
    cells = {cell: run_cell(args, cell) for cell in args.cells}
    gib, first = 2**30, args.cells[0]
    base = max(r["lora_step_s"] for r in cells[first])
    print(f"\n{args.model} at {args.img_size} px, {args.ranks} ranks, global batch {cells[first][0]['global_batch']}, "
          f"LoRA rank {args.rank}: per rank (max over ranks); lora step against {first}")
    print("| cell | lora micro x accum | lora s/step | vs first | images/s | peak GiB full | rebuild | lora | "
          "live GiB full | lora | rebuild s |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for cell, ranks in cells.items():
        step = max(r["lora_step_s"] for r in ranks)
        peaks = [max(r[k] for r in ranks) / gib for k in ("full_peak_bytes", "rebuild_peak_bytes", "lora_peak_bytes",
                                                           "full_live_bytes", "lora_live_bytes")]
        print(f"| {cell} | {ranks[0]['lora_micro']} x {ranks[0]['lora_accum']} | {step:.2f} | {step / base:.2f} | "
              f"{ranks[0]['global_batch'] / step:.1f} | {peaks[0]:.2f} | {peaks[1]:.2f} | {peaks[2]:.2f} | "
              f"{peaks[3]:.2f} | {peaks[4]:.2f} | "
              f"{max(r['rebuild_s'] for r in ranks):.1f} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "cells": cells}, indent=1))


if __name__ == "__main__":
    main()
