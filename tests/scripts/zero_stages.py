"""Runs under a real launcher (2 CPU ranks): the product's own entry point, `prelora_ds.train.main`, once per
ZeRO configuration in one process group, each run through full -> warmup -> lora with the same seed and data.

Usage: deepspeed --num_gpus 2 tests/scripts/zero_stages.py OUT_DIR ARG...
OUT_DIR/<name>/ is each run's output directory; ARG... are the recipe flags every run shares.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path

from prelora_ds.testing.harness import PHASE_ENGINES, REPO


def variants(out: Path) -> dict[str, Path]:
    """ZeRO-1, ZeRO-2 with the optimizer offloaded to CPU, ZeRO-3 (every parameter partitioned) in fp32 and bf16,
    a run that changes its engine per phase (`phased`), and ZeRO-2 as the reference the others are compared with:
    the demo's CPU configs with only `zero_optimization` (and `bf16`, the micro batch) changed."""
    base = json.loads((REPO / "ds_configs" / "cpu_zero2_fp32.json").read_text())
    zero = base["zero_optimization"]
    configs = {
        "stage1": {**base, "zero_optimization": {**zero, "stage": 1}},
        "stage2": base,
        "stage2_offload": {**base, "zero_optimization": {**zero, "offload_optimizer": {"device": "cpu"}},
                           "zero_force_ds_cpu_optimizer": False},
        "stage3": json.loads((REPO / "ds_configs" / "cpu_zero3_fp32.json").read_text()),
    }
    configs["stage3_bf16"] = {**configs["stage3"], "bf16": {"enabled": True}}  # the kept fp32 base, gathered masters
    # ZeRO-3 with half the micro batch in full and warmup; relora and lora rebuild onto ZeRO-2 with twice it (PHASED)
    stage3 = {k: v for k, v in configs["stage3"].items() if k != "gradient_accumulation_steps"}
    configs["phased"] = {**stage3, "train_micro_batch_size_per_gpu": 16, "train_batch_size": 64}
    paths = {}
    for name, cfg in configs.items():  # one file per rank: no rank reads a file another is writing
        paths[name] = out / f"{name}.rank{os.environ.get('RANK', '0')}.json"
        paths[name].write_text(json.dumps(cfg, indent=1))
    return paths


# what a finished run must not leave behind in the process: its engines, their optimizers, its models
LEAKS = ("DeepSpeedEngine", "DeepSpeedZeroOptimizer", "DeepSpeedZeroOptimizer_Stage3", "BF16_Optimizer",
         "VisionTransformer")


def alive() -> dict[str, int]:
    """How many objects of each LEAKS type are still reachable (after a full collection)."""
    gc.collect()
    counts = dict.fromkeys(LEAKS, 0)
    for obj in gc.get_objects():
        if type(obj).__name__ in counts:
            counts[type(obj).__name__] += 1
    return {k: v for k, v in counts.items() if v}


def main(out: Path, args: list[str]) -> None:
    from prelora_ds.train import main as train

    codes, leaks = {}, {}
    for name, config in variants(out).items():
        extra = PHASE_ENGINES if name == "phased" else []  # stage 3 -> 2 at relora, 2 -> 3 at warmup, 3 -> 2 at lora
        codes[name] = train([*args, "--deepspeed_config", str(config), "--output_dir", str(out / name), *extra])
        leaks[name] = alive()  # each run's engines (three to five rebuilds) are gone once it returns
    (out / "codes.json").write_text(json.dumps(codes))
    (out / f"leaks.rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(leaks))


if __name__ == "__main__":
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher puts it first
    main(Path(argv[0]), argv[1:])
