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


def lora_layer_check(out: Path, paths: dict[str, Path]) -> dict[str, dict[str, bool]]:
    """The merged LoRA layer against PEFT's inside ZeRO-2 and ZeRO-3 engines (fp32 and bf16), for the base frozen
    (`lora`) and trainable (`warmup`): each rank's own integer batch through two LoRA'd Linears with integer weights,
    so every product and the 2-rank average are exact; then per parameter the full reduced gradient
    (`safe_get_full_grad`) and the updated fp32 master after one optimizer step, compared bit for bit."""
    import copy

    import deepspeed
    import torch
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad
    from peft import LoraConfig, get_peft_model

    from prelora_ds.lora import merged

    rank = int(os.environ.get("RANK", "0"))
    gen = torch.Generator().manual_seed(0)  # the same weights on every rank
    base = torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.ReLU(), torch.nn.Linear(12, 6))
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(torch.randint(-1, 2, p.shape, generator=gen))
    lora_init = {}
    results: dict[str, dict[str, bool]] = {}
    for name in ("stage2", "stage3", "stage3_bf16"):
        cfg = json.loads(paths[name].read_text())
        cfg.update(train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=1, train_batch_size=8)
        dtype = torch.bfloat16 if cfg.get("bf16", {}).get("enabled") else torch.float32
        for phase in ("lora", "warmup"):
            got = {}
            for kind in ("peft", "merged"):
                lcfg = LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"])
                if kind == "merged":
                    merged.register(lcfg)
                model = get_peft_model(copy.deepcopy(base), lcfg)
                merged.mark_zero3_leaves(model)
                with torch.no_grad():
                    for pname, p in model.named_parameters():
                        if ".lora_" in pname:
                            lora_init.setdefault(pname, torch.randint(-1, 2, p.shape, generator=gen).float())
                            p.copy_(lora_init[pname])
                        p.requires_grad_(".lora_" in pname or phase == "warmup")
                engine, *_ = deepspeed.initialize(
                    model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=cfg)
                xg = torch.Generator().manual_seed(10 + rank)
                x = torch.randint(-1, 2, (4, 5, 8), generator=xg).to(dtype).requires_grad_(True)  # as after a norm
                gout = torch.randint(-1, 2, (4, 5, 6), generator=xg).to(dtype)
                y = engine(x)
                engine.backward((y.float() * gout.float()).sum())
                named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
                grads = {n: safe_get_full_grad(p).clone() for n, p in named}
                engine.step()
                masters = {n: safe_get_full_fp32_param(p).clone() for n, p in named}
                got[kind] = (y.detach().float(), grads, masters)
                engine.destroy()
                del engine, model
            (y0, g0, m0), (y1, g1, m1) = got["peft"], got["merged"]
            results[f"{name}/{phase}"] = {
                "outputs": torch.equal(y0, y1) and bool(y0.abs().max() > 0),
                "grads": g0.keys() == g1.keys()
                and all(torch.equal(g0[k], g1[k]) and g0[k].abs().max() > 0 for k in g0),
                "base_grads": any(".base_layer." in k for k in g0) == (phase == "warmup"),
                "masters": all(torch.equal(m0[k], m1[k]) for k in m0),
            }
    (out / f"lora_layer.rank{rank}.json").write_text(json.dumps(results, indent=1))
    return results


def main(out: Path, args: list[str]) -> None:
    from prelora_ds.train import main as train

    codes, leaks = {}, {}
    for name, config in variants(out).items():
        extra = PHASE_ENGINES if name == "phased" else []  # stage 3 -> 2 at relora, 2 -> 3 at warmup, 3 -> 2 at lora
        codes[name] = train([*args, "--deepspeed_config", str(config), "--output_dir", str(out / name), *extra])
        leaks[name] = alive()  # each run's engines (three to five rebuilds) are gone once it returns
    (out / "codes.json").write_text(json.dumps(codes))
    (out / f"leaks.rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(leaks))
    lora_layer_check(out, variants(out))  # the process group the runs started is still up


if __name__ == "__main__":
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher puts it first
    main(Path(argv[0]), argv[1:])
    gc.freeze()  # no collections over every library's objects at exit (prelora_ds.train.cli)
