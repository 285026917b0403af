"""prelora-train: PreLoRA pre-training of a timm ViT on DeepSpeed ZeRO (stage 2 by default, every stage runs).

Runbook (from the repo root; every flag of the recipe can be overridden as --section.field value):

  # one process (CPU or one GPU)
  python -m prelora_ds.train --recipe recipes/demo.yaml --output_dir runs/demo

  # one node: 2 CPU ranks here, or all GPUs of a GPU node (drop --num_gpus)
  deepspeed --num_gpus 2 --module prelora_ds.train --recipe recipes/demo.yaml --output_dir runs/demo

  # a hostfile on one machine without ssh
  deepspeed --hostfile hostfiles/localhost --no_ssh --node_rank 0 --master_addr 127.0.0.1 \
      --module prelora_ds.train --recipe recipes/demo.yaml --output_dir runs/demo

  # two nodes, one launcher on each (as SLURM or Kubernetes start them); the other node: --node_rank 1
  deepspeed --hostfile H --no_ssh --node_rank 0 --master_addr <node 0's address> \
      --module prelora_ds.train --recipe recipes/demo.yaml --output_dir /shared/runs/demo

  # 16 nodes x 4 A100, ViT-L/16 on ImageNet-1k (pdsh over ssh from node 0; docs/multinode.md)
  deepspeed --hostfile hostfiles/a100_16x4 --module prelora_ds.train --recipe recipes/vit_l_exp2.yaml \
      --data.root /datasets/imagenet --output_dir runs/vit_l_exp2

  # torchrun's elastic agent, one node: a dead rank costs the steps since the last checkpoint, no human (the
  # agent restarts the workers with the same command, so it carries --resume: a fresh directory starts at step 0)
  torchrun --standalone --nproc_per_node 2 --max-restarts 3 -m prelora_ds.train --recipe recipes/demo.yaml \
      --output_dir runs/demo --resume

  # torchrun on 15 or 16 nodes (the same command on every node; the agents need
  # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1): a dead node shrinks the world, a node that comes back grows it again.
  # Every node count in the range must keep the global batch (docs/multinode.md, torchrun): the elastic config's
  # 3840 images with the micro batch derived does (64 a GPU on 15 nodes x 4, 60 on 16); the recipe's 4096 does not
  TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nnodes 15:16 --nproc_per_node 4 --max-restarts 10 \
      --rdzv_backend c10d --rdzv_endpoint <node 0's address>:29400 --rdzv_id exp2 \
      -m prelora_ds.train --recipe recipes/vit_l_exp2.yaml --deepspeed_config ds_configs/vit_large_zero2_elastic.json \
      --data.root /datasets/imagenet --output_dir /shared/runs/exp2 --resume

  # MPI (pip install '.[mpi]')
  mpirun -np 2 prelora-train --recipe recipes/demo.yaml --output_dir runs/demo

  # continue a stopped, killed or crashed run: the same command plus --resume (from the newest complete
  # checkpoint; on another number of ranks too, when the DeepSpeed config fixes train_batch_size)
  ... --resume

Faults and what to do: docs/reliability.md. Exit codes: 2 bad input (nothing started), 1 a run that stopped
with a message (non-finite steps, collective timeout, a checkpoint that could not be written), 75 pre-empted
(SIGTERM, SIGINT or SIGUSR1, or the launcher that started the ranks went: every rank stopped after the same step
and checkpointed it; requeue with --resume).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prelora_ds.config.recipe import load_recipe, parse_override_value
from prelora_ds.config.sections import SPLIT_TARGETS, RunConfig
from prelora_ds.errors import ConfigError, RendezvousError, TrainingError
from prelora_ds.log import RANK_ZERO, logger, setup_logging


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, dict[str, Any]]:
    parser = argparse.ArgumentParser(
        prog="prelora-train",
        description="PreLoRA pre-training on DeepSpeed. Any recipe field: --section.field value.",
    )
    parser.add_argument("--recipe", help="run recipe (YAML), e.g. recipes/demo.yaml")
    parser.add_argument("--deepspeed_config", help="DeepSpeed JSON (default: the recipe's train.deepspeed_config)")
    parser.add_argument("--output_dir", help="run directory (default: the recipe's train.output_dir)")
    parser.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint")
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    args, rest = parser.parse_known_args(argv)
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(rest):
        token = rest[i]
        if not token.startswith("--"):
            raise ConfigError(f"unexpected argument {token!r}; overrides look like --train.max_steps 12.")
        key, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 >= len(rest) or rest[i + 1].startswith("--"):
                raise ConfigError(f"--{key} needs a value, e.g. --{key} 12.")
            value = rest[i + 1]
            i += 1
        if "." not in key:
            raise ConfigError(
                f"unknown flag --{key}; recipe fields are written --section.field (e.g. --train.epochs 5)."
            )
        overrides[key] = parse_override_value(value)
        i += 1
    return args, overrides


def resolve(args: argparse.Namespace, overrides: dict[str, Any]) -> tuple[RunConfig, dict, int]:
    """Validated recipe and DeepSpeed config; no process group needed, so errors come first."""
    from prelora_ds.distributed.launch import world_size_hint

    if args.output_dir:
        overrides["train.output_dir"] = args.output_dir
    if args.deepspeed_config:
        overrides["train.deepspeed_config"] = args.deepspeed_config
    cfg = load_recipe(args.recipe, overrides)
    if not cfg.train.deepspeed_config:
        raise ConfigError(
            "no DeepSpeed config: pass --deepspeed_config ds_configs/cpu_zero2_bf16.json or set "
            "train.deepspeed_config in the recipe."
        )
    world = world_size_hint()
    ds_config = _ds_config(cfg, world)
    import torch

    if not torch.cuda.is_available() and ds_config.get("fp16", {}).get("enabled"):
        raise ConfigError(
            f"{cfg.train.deepspeed_config} enables fp16, which DeepSpeed's CPU accelerator does not support; "
            "use a config with bf16 (ds_configs/cpu_zero2_bf16.json) on CPU."
        )
    return cfg, ds_config, world


@dataclass
class Preflight:
    """What the checks before any process group produced: the validated run, its data and where it writes."""

    cfg: RunConfig
    ds_config: dict
    world_hint: int
    data: Any
    out_dir: Path
    resume: bool


def main(argv: list[str] | None = None) -> int:
    """Pre-flight (exit 2 on bad input, nothing started), start the process group, run, report."""
    setup_logging()
    try:
        pre = preflight(argv)
    except ConfigError as exc:
        logger.error(str(exc))
        return 2
    from prelora_ds.distributed.launch import end_failed_job

    try:
        rank, world, ds_config = start(pre)
        code = run(pre, ds_config, rank, world)  # the process groups are destroyed at exit (launch.init_distributed)
    except RendezvousError as exc:
        logger.error(str(exc))
        code = 1
    except Exception as exc:
        end_failed_job(1, exc)
        raise
    end_failed_job(code)  # under mpirun: a failed rank ends the job instead of waiting for the others at exit
    return code


def preflight(argv: list[str] | None) -> Preflight:
    """Every check that needs no process group, so bad input fails on every rank at once with a ConfigError."""
    args, overrides = parse_args(argv)
    cfg, ds_config, world_hint = resolve(args, overrides)
    from prelora_ds.distributed.hostfile import check_launch

    check_launch()  # a wrong hostfile or --node_rank hangs the rendezvous otherwise
    from prelora_ds.distributed.elastic import check_agent

    if (why := check_agent()) is not None:  # torchrun: a node change would fail the job later
        raise ConfigError(why)
    import torch

    from prelora_ds.data.datasets import build_datasets
    from prelora_ds.data.samplers import check_train_size
    from prelora_ds.engine.model import create_model, input_spec
    from prelora_ds.lora.inject import target_layers
    from prelora_ds.lora.relora import validate_rank

    with torch.device("meta"):  # names and shapes only: no memory, no random init (ViT-H: 2.5 GB a rank)
        probe = create_model(cfg.model, 2, init=False)
    layers = target_layers(probe, cfg.prelora.target_modules)  # a regex that matches nothing fails here
    _check_split_targets(cfg, layers)
    if cfg.relora.enabled:
        validate_rank(probe, layers, cfg.relora.rank)
    img, in_chans, mean, std = input_spec(probe)
    total_params = sum(p.numel() for p in probe.parameters())
    del probe
    data = build_datasets(cfg.data, img, in_chans, seed=cfg.train.seed, mean=mean, std=std)
    check_train_size(len(data.train), ds_config["train_micro_batch_size_per_gpu"], world_hint)
    out_dir = Path(cfg.train.output_dir)
    _check_output_dir(out_dir, args.resume)
    if args.resume:
        _check_resume_fits(out_dir, cfg, data.num_classes, ds_config)
    _check_disk(out_dir, cfg, ds_config, total_params)
    _check_faults()
    return Preflight(cfg, ds_config, world_hint, data, out_dir, args.resume)


def start(pre: Preflight) -> tuple[int, int, dict]:
    """Start the process group (RendezvousError when this rank cannot join); returns (rank, world, the DeepSpeed
    config for the world the launcher really gave)."""
    import faulthandler

    import torch

    from prelora_ds.distributed.launch import init_distributed

    # NCCL's watchdog aborts a rank whose collective outlived train.collective_timeout_s: print where each
    # thread was (the package's function names) before the process goes (docs/gpu.md)
    faulthandler.enable()
    train = pre.cfg.train
    rank, _, world = init_distributed(train.collective_timeout_s, train.rendezvous_timeout_s)  # sets the GPU first
    setup_logging(rank)
    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        # ranks sharing a CPU: one thread pool each, not cores x ranks
        local = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", world)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    # the launcher's world differs from what the environment promised: check the batch arithmetic again
    ds_config = pre.ds_config if world == pre.world_hint else _ds_config(pre.cfg, world)
    return rank, world, ds_config


def run(pre: Preflight, ds_config: dict, rank: int, world: int) -> int:
    """Train on the started process group; returns the exit code (0 done or stopped at train.stop_at_step, 1 a
    run that stopped with a message, 75 pre-empted)."""
    from prelora_ds.distributed import preempt
    from prelora_ds.distributed.supervisor import LauncherWatch
    from prelora_ds.training.trainer import Trainer

    cfg, data, out_dir = pre.cfg, pre.data, pre.out_dir
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(cfg.to_yaml())
        (out_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=1))
    logger.info(
        f"prelora-train: {world} rank(s), images per optimizer step = "
        f"{ds_config['train_micro_batch_size_per_gpu']} micro x {ds_config['gradient_accumulation_steps']} "
        f"accumulation x {world} ranks = {ds_config['train_batch_size']}; "
        f"{len(data.train)} train / {len(data.val)} val images, {data.num_classes} classes"
    )
    watch = LauncherWatch.of_this_process()
    if watch.launchers:
        logger.info(f"launchers of this rank: {watch}; if one goes, every rank stops after that step as for a "
                    "pre-emption")
    trainer = None
    # from here a scheduler's signal, or a launcher that went, stops every rank after a step, with a save
    stop_request = preempt.StopRequest(watch).install()
    try:
        trainer = Trainer(cfg, ds_config, data, out_dir, rank, world, resume=pre.resume, stop_request=stop_request)
        summary = trainer.train()
    except TrainingError as exc:
        logger.error(str(exc))
        return 1
    finally:
        if trainer is not None:
            trainer.close()
        stop_request.uninstall()
    if summary is None:  # pre-empted (requeue), or stopped at train.stop_at_step
        return preempt.EXIT_CODE if trainer.preempted else 0
    logger.info(
        f"prelora-train: done in {summary['wall_time_s']:.1f} s, final val top-1 {summary['final_val_top1']:.2f}%\n"
        f"  TensorBoard: {tool_command('tensorboard')} --logdir {out_dir / 'tb'}\n"
        f"  figures:     {tool_command('prelora')} plot {out_dir}\n"
        f"  summary:     {out_dir / 'summary.json'}\n"
        f"  model:       {out_dir / 'model_merged.safetensors'}\n"
        f"  checkpoints: {out_dir / 'checkpoints'}"
    )
    return 0


def tool_command(name: str) -> str:
    """How to run the installed program `name` from the user's shell: its bare name when PATH finds this
    environment's copy, else its path (relative to the working folder when inside it: `.venv/bin/tensorboard`)."""
    import shutil

    path = Path(sys.executable).parent / name  # console scripts sit beside the interpreter (a venv's bin/)
    if not path.is_file():
        return name
    found = shutil.which(name)
    if found is not None and Path(found).resolve() == path.resolve():
        return name
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _check_split_targets(cfg: RunConfig, layers: list[str]) -> None:
    """A target regex written for timm's fused `attn.qkv` would silently leave q, k and v out of a split model."""
    import re

    fused_target = re.fullmatch(cfg.prelora.target_modules, "blocks.0.attn.qkv")
    if cfg.model.qkv == "split" and fused_target and not any(".attn.q_proj" in n for n in layers):
        raise ConfigError(
            f"model.qkv=split has attn.q_proj, attn.k_proj and attn.v_proj, which prelora.target_modules="
            f"{cfg.prelora.target_modules!r} does not match (it targets the fused attn.qkv); write "
            f"--prelora.target_modules '{SPLIT_TARGETS}'."
        )


def _check_output_dir(out_dir: Path, resume: bool) -> None:
    """A fresh run never writes over the checkpoints of another one."""
    from prelora_ds.checkpoint.storage import complete_tags, nearest_existing

    tags = complete_tags(out_dir / "checkpoints")
    if tags and not resume:
        raise ConfigError(
            f"{out_dir} already holds checkpoints ({tags[-1]} is the newest); add --resume to continue that run, "
            "or pass another --output_dir."
        )
    probe = nearest_existing(out_dir)
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        what = "output_dir" if probe == out_dir else f"output_dir {out_dir}: its parent"
        raise ConfigError(f"{what} {probe} is not a writable folder; pass a writable --output_dir.")


def _check_resume_fits(out_dir: Path, cfg: RunConfig, num_classes: int, ds_config: dict) -> None:
    """A checkpoint of another model, class count, layer selection or global batch fails here, not in DeepSpeed.
    Every rank checks alone, so only sizes and the small files' checksums (trainer_state.json is read here); the
    trainer verifies the checkpoint it resumes in full, and checks its layout again."""
    from prelora_ds.checkpoint import manifest
    from prelora_ds.checkpoint.storage import find_resume, layout_mismatch, mismatch_message, read_trainer_state

    ckpt_dir = out_dir / "checkpoints"
    tag = find_resume(ckpt_dir, lambda t: manifest.verify(ckpt_dir / t, checksum_up_to=manifest.QUICK_BYTES)).tag
    if tag is None:
        return
    from prelora_ds.config.deepspeed import phase_configs
    from prelora_ds.distributed.launch import world_size_hint

    configs = phase_configs(ds_config, cfg.engine, world_size_hint())
    problems = layout_mismatch(read_trainer_state(ckpt_dir / tag), cfg, num_classes, ds_config, configs)
    if problems:
        raise ConfigError(mismatch_message(ckpt_dir / tag, problems))


def _check_disk(out_dir: Path, cfg: RunConfig, ds_config: dict, total_params: int) -> None:
    """Before any process group: can the output disk hold a checkpoint at all (error) and keep_checkpoints + 1
    of them (warning)?"""
    from prelora_ds.checkpoint.storage import check_free_space, estimate_bytes
    from prelora_ds.config.deepspeed import compute_dtype

    need = estimate_bytes(total_params, compute_dtype(ds_config).itemsize)
    try:
        warning = check_free_space(out_dir, need, cfg.train.keep_checkpoints)
    except OSError as exc:
        raise ConfigError(str(exc)) from exc
    if warning:
        logger.warning(warning, extra=RANK_ZERO)


def _check_faults() -> None:
    from prelora_ds.testing import faults

    try:
        faults.active()
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def _ds_config(cfg: RunConfig, world: int) -> dict:
    """The recipe's DeepSpeed config, checked and completed for `world` ranks, with every phase's engine settings
    checked against it (a phase that cannot keep the global batch fails here, before any process group)."""
    from prelora_ds.config.deepspeed import load_ds_config, phase_configs, prepare_ds_config

    ds_config = prepare_ds_config(load_ds_config(cfg.train.deepspeed_config), world)
    phase_configs(ds_config, cfg.engine, world)
    return ds_config


def cli() -> None:
    """The `prelora-train` command (and `python -m prelora_ds.train`): main(), then exit with its code.

    Before the exit, every object alive goes to the collector's permanent generation (gc.freeze): the interpreter's
    teardown otherwise runs full collections over every object of torch, DeepSpeed, PEFT and timm, about 2.5 s a
    process here, after the run is over. Exit handlers still run (process groups destroyed, logs flushed); files
    are written and closed by then (Trainer.close). main() alone, as tests and scripts call it, freezes nothing."""
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    cli()
