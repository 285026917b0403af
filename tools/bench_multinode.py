"""What each PreLoRA phase moves between two nodes per step, and its step time on a limited link.

  sudo python tools/bench_multinode.py --out docs/bench_multinode.json     # root: makes two test hosts

Two hosts (network namespaces joined by a veth pair, prelora_ds/testing/two_hosts.py), 1 rank each, launched by
`deepspeed --hostfile H --no_ssh --node_rank N` on each. For each link rate (`tc` tbf on both ends: unlimited,
10 Gbit/s, 1 Gbit/s) one job runs full, warmup and lora in turn (prelora_ds's Trainer built in that phase,
LoRA rank --rank on every target layer, synthetic images) and records, over --steps steps after --warmup:
DeepSpeed's comms_logger (ZeRO's collectives: op, message bytes, count) and the bytes that crossed node0's
interface (its kernel counters: every collective, gloo's and TCP's overhead included), and the median step
time. Prints a markdown table; writes the JSON to --out (default: runs/bench_multinode.json in the checkout) and each
job's launcher logs beside it (runs/bench_multinode.<rate>.node<N>.log), owned by the user who ran sudo.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from prelora_ds.cli import HelpFormatter
from prelora_ds.testing.harness import BIN, deepspeed_cmd, free_port

ROOT = Path(__file__).resolve().parents[1]
TARGETS = r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc[12])"
PHASES = ("full", "warmup", "lora")


def link_bytes() -> int:
    """tx + rx bytes of the interface gloo uses (GLOO_SOCKET_IFNAME, set by prelora_ds.distributed.netif)."""
    stats = Path("/sys/class/net") / os.environ["GLOO_SOCKET_IFNAME"] / "statistics"
    return sum(int((stats / f).read_text()) for f in ("tx_bytes", "rx_bytes"))


def worker(args) -> None:
    """One rank of the job: each phase in turn on the same process group."""
    import deepspeed.comm as dscomm
    import torch

    from prelora_ds.config.sections import ModelConfig
    from prelora_ds.distributed import collectives
    from prelora_ds.engine.model import count_params, create_model
    from prelora_ds.lora.inject import target_layers
    from prelora_ds.testing.harness import start_distributed, synthetic_trainer

    rank, _, world = start_distributed(600)
    with torch.device("meta"):
        model_cfg = ModelConfig(name=args.model, kwargs={"img_size": args.img_size})
        layers = target_layers(create_model(model_cfg, 10, init=False), TARGETS)
    gen = torch.Generator().manual_seed(rank)
    batch = [(torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=gen),
              torch.randint(0, 10, (args.batch_size,), generator=gen))]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for phase in PHASES:
            ranks = {n: args.rank for n in layers} if phase != "full" else None
            trainer = synthetic_trainer(
                Path(tmp) / phase, model=args.model, model_kwargs={"img_size": args.img_size}, img_size=args.img_size,
                ds_config=ROOT / "ds_configs" / "cpu_zero2_fp32.json", micro_batch=args.batch_size,
                ds_changes={"gradient_accumulation_steps": 1,
                            "comms_logger": {"enabled": True, "prof_all": True, "verbose": False}},
                train_size=args.batch_size * world * 8, val_size=args.batch_size, first_phase=phase, start_ranks=ranks,
                num_threads=max(1, (os.cpu_count() or 2) // 2),  # the two "hosts" share this machine's cores
                train={"lr_warmup_steps": 0, "epochs": 1000}, prelora={"target_modules": TARGETS},
            )  # fmt: skip
            for _ in range(args.warmup):
                trainer.train_step(batch)
            collectives.barrier()
            dscomm.comms_logger.comms_dict.clear()
            wire0, times = link_bytes(), []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                trainer.train_step(batch)
                times.append(time.perf_counter() - t0)
            wire = link_bytes() - wire0
            ops = {op: {str(size): v[0] for size, v in sizes.items()}
                   for op, sizes in dscomm.comms_logger.comms_dict.items()}
            logged = sum(int(size) * v[0] for sizes in dscomm.comms_logger.comms_dict.values()
                         for size, v in sizes.items())
            trainable, total = count_params(trainer.engine.module)
            step_s = collectives.all_reduce_max([statistics.median(times)])[0]  # the slower rank sets the pace
            results[phase] = {"median_step_s": step_s, "comms_logger_bytes_per_step": logged / args.steps,
                              "link_bytes_per_step": wire / args.steps, "ops_per_step": ops,
                              "trainable_params": trainable, "total_params": total}
            trainer.close()
            dscomm.comms_logger.comms_dict.clear()
    if rank == 0:
        Path(args.result).write_text(json.dumps(results, indent=1))


def give_to_sudo_user(*paths: Path) -> None:
    """Under sudo, what this run wrote in the checkout (runs/ included, when it made it) belongs to the user who ran
    sudo, so that later runs without root can write there."""
    uid, gid = os.environ.get("SUDO_UID"), os.environ.get("SUDO_GID")
    if os.geteuid() == 0 and uid and gid:
        for path in paths:
            os.chown(path, int(uid), int(gid))


def launch(hosts, hostfile: Path, args, result: Path, logs: Path) -> None:
    """One job on both hosts; each node's launcher output goes to `logs`.node<N>.log (kept: a failed job names it)."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}
    env.pop("GLOO_SOCKET_IFNAME", None)
    worker_args = ["--worker", "--result", str(result), "--model", args.model, "--img-size", str(args.img_size),
                   "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--rank", str(args.rank)]
    procs, port = [], free_port()  # one rendezvous port for both hosts
    for i, h in enumerate(hosts.node):
        flags = ["--hostfile", hostfile, "--no_ssh", "--node_rank", str(i), "--master_addr", hosts.node[0].addr]
        cmd = deepspeed_cmd(*worker_args, ranks=None, port=port, script=__file__, launcher_args=flags)
        log = open(f"{logs}.node{i}.log", "w")
        procs.append(subprocess.Popen(hosts.cmd(h, cmd), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    codes = [p.wait(timeout=1800) for p in procs]
    if codes != [0, 0]:
        raise SystemExit(f"the job failed ({codes}); see {logs}.node0.log and {logs}.node1.log")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--model", default="vit_small_patch16_224", help="timm model name")
    parser.add_argument("--img-size", type=int, default=64,
                        help="image side in px: sizes the model (its position embedding) and the synthetic inputs")
    parser.add_argument("--batch-size", type=int, default=8, help="micro batch per rank")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per phase")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per phase before the timed ones")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank on every target layer (warmup, lora)")
    parser.add_argument("--rates", default="none,10gbit,1gbit", help="tc tbf rates, comma-separated; none: no limit")
    parser.add_argument("--out", help="the JSON result; each job's launcher logs go beside it, named after it with "
                        ".<rate>.node<N>.log (default: runs/bench_multinode.json in the checkout)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # from the deepspeed launcher
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    from prelora_ds.testing.two_hosts import TwoHosts

    out_path = Path(args.out).resolve() if args.out else ROOT / "runs" / "bench_multinode.json"
    made = [d for d in (out_path.parent, *out_path.parent.parents) if not d.exists()]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out = {"command": " ".join(["python", "tools/bench_multinode.py", *sys.argv[1:]]), "rates": {}}
    try:
        with tempfile.TemporaryDirectory() as tmp, TwoHosts("pl14b", subnet="10.78.0") as hosts:
            hostfile = Path(tmp) / "hostfile"
            hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
            for rate in args.rates.split(","):
                hosts.limit(None if rate == "none" else rate)
                result = Path(tmp) / f"{rate}.json"
                t0 = time.perf_counter()
                launch(hosts, hostfile, args, result, out_path.with_suffix(f".{rate}"))
                out["rates"][rate] = json.loads(result.read_text())
                print(f"{rate}: {time.perf_counter() - t0:.0f} s", flush=True)
        out_path.write_text(json.dumps(out, indent=1))
    finally:  # a failed job's logs too
        written = [out_path] if out_path.exists() else []
        give_to_sudo_user(*made, *written, *out_path.parent.glob(f"{out_path.stem}.*.node*.log"))
    print(f"wrote {out_path}")
    print(f"\n{args.model} img {args.img_size}, batch {args.batch_size} per rank, 2 nodes x 1 rank, "
          f"LoRA rank {args.rank}")
    print("| phase | trainable | ZeRO bytes/step (comms_logger) | link bytes/step | " +
          " | ".join(f"s/step {r}" for r in out["rates"]) + " |")
    print("|---|---|---|---|" + "---|" * len(out["rates"]))
    first = next(iter(out["rates"].values()))
    for phase in PHASES:
        r = first[phase]
        times = " | ".join(f"{out['rates'][k][phase]['median_step_s']:.3f}" for k in out["rates"])
        print(f"| {phase} | {r['trainable_params'] / 1e6:.2f}M | {r['comms_logger_bytes_per_step'] / 1e6:.1f} MB | "
              f"{r['link_bytes_per_step'] / 1e6:.1f} MB | {times} |")


if __name__ == "__main__":
    main()
