"""What each PreLoRA phase costs, measured side by side against a bare DeepSpeed + PEFT loop.

  python tools/bench_phases.py --model vit_base_patch16_224 --batch-size 2 --steps 5 --out bench.json

Each phase runs in its own process (world size 1, ZeRO-2 from --ds-config), so a phase's peak memory
(peak RSS on CPU, max_memory_allocated on GPU) is not polluted by an earlier one. Per phase: median step
time after warm-up steps, peak memory, trainable/total parameters, optimizer-state bytes. `ours` runs
`prelora_ds.training.trainer.Trainer.train_step` on the phase's structure (LoRA rank `--rank` on every target
layer, the same for both); `bare` is plain `deepspeed.initialize` + `peft.get_peft_model`, no prelora_ds
code on the step path. One more process times the in-process switches full -> warmup -> lora and RSS
over 5 rebuilds; the `full` worker also times the norm statistics and the convergence test.
Writes the JSON to --out and prints a markdown table of ratios (all from this one run).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from prelora_ds.cli import HelpFormatter

ROOT = Path(__file__).resolve().parents[1]
TARGETS = r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc[12])"
EXTRA = r"head|fc_norm|norm|blocks\.\d+\.norm[12]"


def peak_mem() -> int:
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def optimizer_state_bytes(engine) -> int:
    """fp32 master partitions + the base optimizer's state tensors (Adam moments)."""
    opt = engine.optimizer
    total = sum(t.numel() * t.element_size() for t in getattr(opt, "single_partition_of_fp32_groups", []))
    base = getattr(opt, "optimizer", opt)
    for state in base.state.values():
        total += sum(v.numel() * v.element_size() for v in state.values() if hasattr(v, "numel") and v.dim() > 0)
    return total


def ds_config(path: str, batch: int) -> dict:
    cfg = json.loads(Path(path).read_text())
    cfg.update(train_micro_batch_size_per_gpu=batch, gradient_accumulation_steps=1, train_batch_size=batch)
    return cfg


def top_functions(prof, column: int, count: int, scale: float) -> list[list]:
    """The `count` functions of a cProfile run with the largest value in pstats column `column` (2: own time,
    3: cumulative time), as ["file:line(name)", value * scale]."""
    import pstats

    stats = pstats.Stats(prof).stats  # {(file, line, name): (calls, ncalls, tottime, cumtime, callers)}
    top = sorted(stats.items(), key=lambda kv: kv[1][column], reverse=True)[:count]
    return [[f"{Path(f).name}:{line}({name})", round(v[column] * scale, 3)] for (f, line, name), v in top]


def timed_steps(step, n_warm: int, n: int, profile: dict | None = None) -> list[float]:
    """Per-step seconds after `n_warm` untimed steps; with `profile` (a dict), also the functions the timed
    steps spend their time in (cProfile, own time per step), to say where a difference comes from."""
    import cProfile
    import pstats

    import torch

    times = []
    prof = cProfile.Profile() if profile is not None else None
    for i in range(n_warm + n):
        if prof is not None and i == n_warm:
            prof.enable()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if i >= n_warm:
            times.append(time.perf_counter() - t0)
    if prof is not None:
        prof.disable()
        profile["top_tottime_per_step_ms"] = top_functions(prof, 2, 15, 1e3 / n)
        profile["python_calls_per_step"] = round(sum(v[1] for v in pstats.Stats(prof).stats.values()) / n)
    return times


def model_kwargs(args) -> dict:
    """timm kwargs of the model on both sides: --img-size sizes it (its position embedding) as it sizes the inputs."""
    return {"img_size": args.img_size}


def ours_model(args, init: bool = True):
    """The model prelora_ds's Trainer builds for `ours` (the package's create_model on ours_trainer's kwargs)."""
    from prelora_ds.config.sections import ModelConfig
    from prelora_ds.engine.model import create_model

    return create_model(ModelConfig(name=args.model, kwargs=model_kwargs(args)), 10, init=init)


def bare_model(args):
    """The model of `bare`: plain timm."""
    import timm

    return timm.create_model(args.model, num_classes=10, **model_kwargs(args))


def ours_trainer(args, phase: str = "full", ranks: dict[str, int] | None = None):
    """prelora_ds's Trainer on synthetic images, world size 1 (a plain process), starting in `phase`."""
    from prelora_ds.testing import harness

    return harness.synthetic_trainer(
        Path(args.tmp), model=args.model, model_kwargs=model_kwargs(args), img_size=args.img_size,
        ds_config=ds_config(args.ds_config, args.batch_size), micro_batch=args.batch_size,
        train_size=args.batch_size * 4, val_size=args.batch_size, first_phase=phase, start_ranks=ranks,
        train={"lr_warmup_steps": 0, "epochs": 1000}, prelora={"target_modules": TARGETS, "trainable_extra": EXTRA},
    )  # fmt: skip


def worker_ours(args) -> dict:
    import torch

    from prelora_ds.algorithm.convergence import partial_convergence
    from prelora_ds.engine import norms
    from prelora_ds.engine.model import count_params
    from prelora_ds.lora.inject import target_layers

    with torch.device("meta"):
        layers = target_layers(ours_model(args, init=False), TARGETS)
    ranks = {n: args.rank for n in layers} if args.phase != "full" else None
    trainer = ours_trainer(args, args.phase, ranks)
    img = args.img_size
    gen = torch.Generator().manual_seed(0)
    batch = [(torch.randn(args.batch_size, 3, img, img, generator=gen), torch.randint(0, 10, (args.batch_size,)))]
    prof = {} if args.profile else None
    times = timed_steps(lambda: trainer.train_step(batch), args.warmup, args.steps, prof)
    trainable, total = count_params(trainer.engine.module)
    out = {"median_step_s": statistics.median(times), "step_s": times, "peak_mem_bytes": peak_mem(),
           **({"profile": prof} if prof else {}),
           "images_per_s": args.batch_size / statistics.median(times),
           "trainable_params": trainable, "total_params": total,
           "optimizer_state_bytes": optimizer_state_bytes(trainer.engine)}
    if args.phase == "relora":  # one merge-and-reinit with Adam-state pruning, in place (ZeRO fragments)
        from prelora_ds.engine import moments
        from prelora_ds.lora import relora

        t0 = time.perf_counter()
        relora.merge_and_reinit(trainer.engine.module, trainer.phases.frozen_fp32, 0, 0)
        moments.link_state(trainer.engine.optimizer)
        relora.prune_optimizer_state(trainer.engine.module, 0.9, False)
        out["merge_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()  # the alternative: merge by rebuilding the engine around the merged state
        trainer.switch_to("relora", ranks, merge_lora=True)
        out["merge_by_rebuild_s"] = time.perf_counter() - t0
    if args.phase == "full":
        t = timed_steps(lambda: norms.sample(trainer.engine.module, trainer.phases.layout, {}, 0, 1.0, 1.0), 1, 5)
        out["norm_stats_s"] = statistics.median(t)
        windows = 100  # a long history of windows at this model's layer count
        modules = trainer.phases.layout.modules
        norm_w = {m: [[1.0 + 0.01 * k] * len(v) for k in range(windows)] for m, v in modules.items()}
        loss_w = [2.0 - 0.001 * k for k in range(windows)]
        t = timed_steps(lambda: partial_convergence(loss_w, norm_w, 3, 1.0, 5.0), 1, 5)
        out["convergence_test_s"] = statistics.median(t)
    trainer.close()
    return out


def worker_bare(args) -> dict:
    """Plain DeepSpeed + PEFT: the same model, ranks, config and batch, no prelora_ds code."""
    import deepspeed
    import torch
    from peft import LoraConfig, get_peft_model
    from timm.optim import param_groups_weight_decay

    from prelora_ds.testing.harness import start_distributed

    start_distributed()
    torch.manual_seed(0)
    model = bare_model(args)
    if args.phase != "full":
        model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS))
        import re

        extra = re.compile(EXTRA)
        for name, p in model.named_parameters():
            owner = name.removeprefix("base_model.model.").replace(".base_layer.", ".").rpartition(".")[0]
            p.requires_grad_(".lora_" in name or args.phase == "warmup" or bool(extra.fullmatch(owner)))
    params = [p for p in model.parameters() if p.requires_grad]
    config = ds_config(args.ds_config, args.batch_size)
    # the same weight-decay groups as a timm training script (timm, not prelora_ds)
    groups = param_groups_weight_decay(model, config["optimizer"]["params"].get("weight_decay", 0.0))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[g for g in groups if g["params"]], config=config)
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=gen).to(engine.device, dtype)
    y = torch.randint(0, 10, (args.batch_size,)).to(engine.device)

    def step():
        loss = torch.nn.functional.cross_entropy(engine(x).float(), y)
        engine.backward(loss)
        engine.step()

    prof = {} if args.profile else None
    times = timed_steps(step, args.warmup, args.steps, prof)
    return {"median_step_s": statistics.median(times), "step_s": times, "peak_mem_bytes": peak_mem(),
            **({"profile": prof} if prof else {}),
            "images_per_s": args.batch_size / statistics.median(times),
            "trainable_params": sum(p.numel() for p in params),
            "total_params": sum(p.numel() for p in model.parameters()),
            "optimizer_state_bytes": optimizer_state_bytes(engine)}


def worker_switch(args) -> dict:
    """full -> warmup -> lora in one process, then --rebuilds more: switch times and RSS after each."""
    import gc

    import psutil
    import torch

    trainer = ours_trainer(args)
    ranks = {n: args.rank for n in trainer.phases.layout.layers}
    if args.profile:  # where the full -> warmup rebuild spends its time (cumulative, top 25)
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    out = {"warmup": trainer.switch_to("warmup", ranks)}
    if args.profile:
        prof.disable()
        out["profile_full_to_warmup_cumulative_s"] = top_functions(prof, 3, 25, 1.0)
    out["lora"] = trainer.switch_to("lora")
    rss = []
    for i in range(args.rebuilds):
        trainer.switch_to("warmup" if i % 2 == 0 else "lora")
        gc.collect()
        rss.append(psutil.Process().memory_info().rss if not torch.cuda.is_available()
                   else torch.cuda.memory_allocated())
    out["rebuild_mem_bytes"] = rss
    trainer.close()
    return out


def run_worker(args, kind: str, phase: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--phase", phase, "--model", args.model,
           "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--ds-config", args.ds_config, "--rank", str(args.rank), "--img-size", str(args.img_size),
           "--tmp", args.tmp, "--rebuilds", str(args.rebuilds), *(["--profile"] if args.profile else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{kind}/{phase} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def table(result: dict) -> str:
    full = result["phases"]["full"]
    rows = ["| phase | step s | vs full | vs bare | images/s | peak mem GiB | vs full | vs bare | trainable | share "
            "| optimizer state MiB |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, p in result["phases"].items():
        bare = result["bare"][name]
        ratio = result.get("bare_ratio", {}).get(name)
        vs_bare = f"{p['median_step_s'] / bare['median_step_s']:.2f}"
        if ratio and len(ratio["pairs"]) > 1:
            vs_bare = f"{ratio['median']:.2f} ({ratio['min']:.2f}-{ratio['max']:.2f})"
        rows.append(
            f"| {name} | {p['median_step_s']:.3f} | {p['median_step_s'] / full['median_step_s']:.2f} | "
            f"{vs_bare} | {p['images_per_s']:.1f} | "
            f"{p['peak_mem_bytes'] / 2**30:.2f} | {p['peak_mem_bytes'] / full['peak_mem_bytes']:.2f} | "
            f"{p['peak_mem_bytes'] / bare['peak_mem_bytes']:.2f} | {p['trainable_params']:,} | "
            f"{100 * p['trainable_params'] / p['total_params']:.1f}% | {p['optimizer_state_bytes'] / 2**20:.0f} |"
        )
    sw = result["switch_s"]
    if result.get("repeats", 1) > 1:
        rows.append("")
        rows.append(f"step vs bare: median (min-max) of the ratios of {result['repeats']} interleaved ours/bare "
                    "process pairs; step s: the median pair's run")
    rows.append("")
    mem = ", ".join(f"{m / 2**30:.2f}" for m in sw["rebuild_mem_bytes"])
    rows.append(f"switch full->warmup {sw['warmup']:.2f} s, warmup->lora {sw['lora']:.2f} s; memory after each of "
                f"{len(sw['rebuild_mem_bytes'])} rebuilds: {mem} GiB")
    rows.append(f"norm statistics: {100 * full['norm_stats_s'] / full['median_step_s']:.3f}% of a full step "
                f"(sampled at most once a step); convergence test: {1e3 * full['convergence_test_s']:.3f} ms")
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--model", default="vit_base_patch16_224", help="timm model name")
    p.add_argument("--batch-size", type=int, default=2, help="micro batch (world size 1, no accumulation)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per worker")
    p.add_argument("--warmup", type=int, default=2, help="steps run before timing")
    # fp32 on CPU: bf16 matmuls are emulated (~20x slower) on CPUs without AVX-512 BF16 / AMX
    p.add_argument("--ds-config", default=None, help="DeepSpeed config, for both sides (default: "
                   "ds_configs/gpu_single_bf16.json on GPU, ds_configs/cpu_zero2_fp32.json on CPU)")
    p.add_argument("--rank", type=int, default=32, help="LoRA rank on every target layer (ours and bare)")
    p.add_argument("--img-size", type=int, default=224,
                   help="image side in px: sizes the model (its position embedding) and the synthetic inputs")
    p.add_argument("--phases", nargs="+", default=["full", "warmup", "lora"],
                   help="phases to measure, of: full, warmup, lora, relora (default: full warmup lora)")
    p.add_argument("--out", help="also write the JSON result to this file (default: printed only, the markdown "
                   "table; with --only-switch the switch times)")
    p.add_argument("--tmp", default="/tmp/prelora_bench", help="the Trainer's output folder (ours, switch)")
    p.add_argument("--repeats", type=int, default=1,
                   help="ours/bare process pairs per phase, interleaved (ABAB); ratios are per pair, then the median")
    p.add_argument("--rebuilds", type=int, default=5, help="engine rebuilds after the two switches (memory trend)")
    p.add_argument("--only-switch", action="store_true",
                   help="only the switch worker: switch times, memory trend (default: every worker)")
    p.add_argument("--profile", action="store_true",
                   help="cProfile the timed steps of every worker, slower steps (default: off)")
    p.add_argument("--worker", choices=["ours", "bare", "switch"], help=argparse.SUPPRESS)
    p.add_argument("--phase", default="full", help=argparse.SUPPRESS)
    return p


def main() -> None:
    args = build_parser().parse_args()
    if args.ds_config is None:
        import torch

        name = "gpu_single_bf16.json" if torch.cuda.is_available() else "cpu_zero2_fp32.json"
        args.ds_config = str(ROOT / "ds_configs" / name)
    # the workers run in the checkout: paths given relative to where this was started are made absolute
    args.ds_config, args.tmp = str(Path(args.ds_config).resolve()), str(Path(args.tmp).resolve())
    if args.worker:
        fn = {"ours": worker_ours, "bare": worker_bare, "switch": worker_switch}[args.worker]
        print("RESULT " + json.dumps(fn(args)), flush=True)
        return
    import torch

    result = {"model": args.model, "batch_size": args.batch_size, "img_size": args.img_size, "rank": args.rank,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "ds_config": Path(args.ds_config).name, "phases": {}, "bare": {}}
    result["repeats"] = args.repeats
    result["bare_ratio"] = {}
    for phase in [] if args.only_switch else args.phases:  # ours, bare, ours, bare, ...: drift and noise hit both alike
        pairs = []
        for _ in range(args.repeats):
            pairs.append((run_worker(args, "ours", phase), run_worker(args, "bare", phase)))
            print(f"{phase}: ours {pairs[-1][0]['median_step_s']:.3f} s, bare {pairs[-1][1]['median_step_s']:.3f} s",
                  file=sys.stderr, flush=True)
        ratios = [o["median_step_s"] / b["median_step_s"] for o, b in pairs]
        for key, side in (("phases", 0), ("bare", 1)):  # the run with the median step time stands for the phase
            runs = sorted((pair[side] for pair in pairs), key=lambda r: r["median_step_s"])
            result[key][phase] = {**runs[len(runs) // 2], "repeat_step_s": [r["median_step_s"] for r in runs]}
        result["bare_ratio"][phase] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
                                       "pairs": ratios}
    result["switch_s"] = run_worker(args, "switch", "full")
    if args.only_switch:
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=1))
        print(json.dumps(result["switch_s"]))
        return
    md = table(result)
    result["table_md"] = md
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(md)


if __name__ == "__main__":
    main()
