"""Sharpness of a checkpoint along the LoRA target layers' weights: the largest eigenvalue of the training loss's
Hessian restricted to them, raw and preconditioned by Adam's second moment, by power iteration on a fixed batch.

  prelora sharpness runs/demo_relora --step 300 --images 512
  prelora sharpness runs/demo_full --step 300 --images 512 --json full.json

Why: the phase after `relora` trains the base again at the schedule's LR. Adam's step is stable while the
preconditioned sharpness lambda_max(P^-1 H), P = sqrt(v_hat) + eps, stays under about 38 / LR (beta1 0.9, a full
batch; Cohen et al. 2022, "Adaptive gradient methods at the edge of stability"; mini-batch noise lowers the bound).
The number to read is a checkpoint's value against full training's at the same step and seed, not against the bound
(docs/study.md, the base's LR after `relora`).

The model: the checkpoint's fp32 values (DeepSpeed's universal conversion, written once to `<tag>_universal/` beside
the checkpoint, as a resume on another world size does), every LoRA factor pair merged (W + (alpha/r) B A). Adam's
v: in a `relora` checkpoint the base's kept moments (`dormant_moments.pt`, what `warmup` starts from), else each
weight's own. It also prints the loaded model's val top-1 (the run's own at a validation step, up to float
rounding). The batch: `--images` training images evenly spaced over the set, with the run's seeded augmentation of
epoch 0 (the same images for every run of a seed), the run's label smoothing, no mixup. One process, on the GPU
when there is one; `--micro` images per forward bound its memory (lower it for a large model).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from prelora_ds.cli import CommandError

Vectors = list[torch.Tensor]


def top_eigenvalue(hvp: Callable[[Vectors], Vectors], shapes: Sequence[torch.Size], iters: int = 60,
                   tol: float = 1e-3, seed: int = 0, device: str | torch.device = "cpu") -> float:  # fmt: skip
    """The eigenvalue of largest magnitude of the symmetric operator `hvp` (on tensors of `shapes`), by power
    iteration from a seeded random start, stopped when two estimates agree to `tol` (relative)."""
    gen = torch.Generator().manual_seed(seed)
    u = [torch.randn(s, generator=gen).to(device) for s in shapes]
    lam = 0.0
    for it in range(iters):
        norm = torch.sqrt(sum((x.double() ** 2).sum() for x in u))
        u = [x / norm for x in u]
        hu = hvp(u)
        new = float(sum((a.double() * b.double()).sum() for a, b in zip(u, hu, strict=True)))
        if it and abs(new - lam) <= tol * abs(new):
            return new
        lam, u = new, [h.detach() for h in hu]
    return lam


def preconditioned(hvp: Callable[[Vectors], Vectors], scale: Vectors) -> Callable[[Vectors], Vectors]:
    """S H S with S = P^-1/2 (elementwise): the same eigenvalues as P^-1 H, and symmetric."""
    return lambda u: [h * s for h, s in zip(hvp([x * s for x, s in zip(u, scale, strict=True)]), scale, strict=True)]


def adam_scale(v: torch.Tensor, count: int, beta2: float, eps: float) -> torch.Tensor:
    """P^-1/2 for Adam's preconditioner P = sqrt(v / (1 - beta2^count)) + eps."""
    return (torch.sqrt(v.float() / (1 - beta2**count)) + eps).rsqrt()


def load_state(run: Path, tag: str, alpha_ratio: float
               ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, torch.Tensor]]]:  # fmt: skip
    """(canonical name -> fp32 value, LoRA factors merged at alpha / r = `alpha_ratio` (`prelora.alpha_ratio`, every
    LoRA layer's, inject.py); canonical name -> (Adam count, exp_avg_sq)) of a checkpoint: the universal conversion's
    values and moments, the frozen base's kept fp32 copy, the dormant moments of a `relora` checkpoint (they win: the
    base's state for `warmup`)."""
    from prelora_ds.checkpoint import storage
    from prelora_ds.lora.inject import canonical_name
    from prelora_ds.lora.merge import LORA_A, merge_lora

    ckpt_dir = run / "checkpoints"
    if not storage.holds_partitions(ckpt_dir / tag):
        raise CommandError(f"{ckpt_dir / tag} was saved by a ZeRO stage-0 engine: sharpness reads the values "
                           "and moments through DeepSpeed's universal conversion, which needs ZeRO partitions; measure "
                           "a checkpoint of a run on ZeRO stage 1-3")
    universal = storage.to_universal(ckpt_dir, tag) / "zero"
    values = dict(storage.read_frozen_fp32(ckpt_dir / tag))
    second: dict[str, tuple[int, torch.Tensor]] = {}
    for folder in sorted(p for p in universal.iterdir() if p.is_dir()):
        name = canonical_name(folder.name)
        values[name] = torch.load(folder / "fp32.pt", weights_only=False)["param"].float()
        if (folder / "exp_avg_sq.pt").exists():
            count = torch.load(folder / "step.pt", weights_only=False)
            count = int(count["param"] if isinstance(count, dict) else count)
            v = torch.load(folder / "exp_avg_sq.pt", weights_only=False)["param"]
            second[name] = (count, v.reshape(values[name].shape))
    for name, (count, state) in storage.read_dormant(ckpt_dir / tag).items():
        second[name] = (count, state["exp_avg_sq"])
    scales = {k[: -len(LORA_A)]: alpha_ratio for k in values if k.endswith(LORA_A)}
    return merge_lora(values, scales), second


def measure(run: Path, tag: str, images: int, micro: int, iters: int) -> dict:
    import dataclasses

    from torch.func import functional_call

    from prelora_ds.config.recipe import load_recipe
    from prelora_ds.data.datasets import build_datasets
    from prelora_ds.engine.model import create_model, input_spec
    from prelora_ds.lora.inject import target_layers

    cfg = load_recipe(run / "config.yaml")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    state, second = load_state(run, tag, cfg.prelora.alpha_ratio)
    with torch.device("meta"):  # the input geometry only, as train.py's probe: no second model in memory
        img, chans, mean, std = input_spec(create_model(cfg.model, 10, init=False))
    # decoded tensors here (`data.loader: device` hands the trainer encoded bytes to decode on the GPU)
    data = build_datasets(dataclasses.replace(cfg.data, loader="torch"), img, chans, cfg.train.seed, mean, std)
    model = create_model(cfg.model, data.num_classes)
    model.load_state_dict(state)
    for m in model.modules():  # the double backward needs the math attention (no fused kernel has one)
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    model.to(device).eval()  # eval: no dropout / drop-path, so the operator is one fixed function
    names = [f"{layer}.weight" for layer in target_layers(model, cfg.prelora.target_modules)]
    if not names:
        raise CommandError(f"no layer of {cfg.model.name} matches prelora.target_modules")
    missing = [n for n in names if n not in second]
    if missing:
        raise CommandError(f"{tag} holds no Adam state for {missing[:3]} (a checkpoint of `lora`, base frozen?)")
    params = {n: p.detach() for n, p in model.named_parameters()}
    correct, n_val = 0, len(data.val)
    with torch.no_grad():  # the loaded model is the run's: its val top-1 is the one the run logged at this step
        for i in range(0, n_val, micro):  # `micro` images at a time: ImageNet's val set does not fit in memory
            chunk = [data.val[j] for j in range(i, min(i + micro, n_val))]
            logits = model(torch.stack([b[0] for b in chunk]).to(device))
            correct += int((logits.argmax(1).cpu() == torch.tensor([int(b[1]) for b in chunk])).sum())
    n_img = min(images, len(data.train))
    # evenly spaced over the training set: a sorted ImageFolder's first images are all of one class
    batch = [data.train[i] for i in torch.linspace(0, len(data.train) - 1, n_img).round().long().tolist()]
    x = torch.stack([b[0] for b in batch])
    y = torch.tensor([int(b[1]) for b in batch])
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=cfg.data.label_smoothing)

    def grads(weights: dict[str, torch.Tensor], xs, ys, create_graph: bool) -> tuple[torch.Tensor, Vectors]:
        loss = loss_fn(functional_call(model, {**params, **weights}, (xs.to(device),)), ys.to(device))
        return loss, list(torch.autograd.grad(loss, [weights[n] for n in names], create_graph=create_graph))

    chunks = [(x[i : i + micro], y[i : i + micro]) for i in range(0, n_img, micro)]

    def hvp(vec: Vectors) -> Vectors:  # the whole batch's mean loss: chunks weighted by their size
        total = [torch.zeros_like(v) for v in vec]
        for xs, ys in chunks:
            w = {n: params[n].clone().requires_grad_(True) for n in names}
            _, g = grads(w, xs, ys, create_graph=True)
            hv = torch.autograd.grad(g, [w[n] for n in names], grad_outputs=vec)
            total = [t + h.detach() * (len(ys) / n_img) for t, h in zip(total, hv, strict=True)]
        return total

    loss_sum, grad = 0.0, None  # the batch's mean loss and its gradient on the target layers
    for xs, ys in chunks:
        loss, g = grads({n: params[n].clone().requires_grad_(True) for n in names}, xs, ys, create_graph=False)
        loss_sum += float(loss.detach()) * len(ys)
        g = [gi * (len(ys) / n_img) for gi in g]
        grad = g if grad is None else [a + b for a, b in zip(grad, g, strict=True)]
    shapes = [params[n].shape for n in names]
    opt = json.loads((run / "ds_config.json").read_text()).get("optimizer", {}).get("params", {})
    beta2, eps = float(opt.get("betas", (0.9, 0.999))[1]), float(opt.get("eps", 1e-8))
    scale = [adam_scale(second[n][1], second[n][0], beta2, eps).to(device) for n in names]
    dormant = (run / "checkpoints" / tag / "dormant_moments.pt").exists()
    return {
        "checkpoint": str(run / "checkpoints" / tag), "images": n_img, "layers": len(names),
        "val_top1": 100.0 * correct / n_val, "train_loss": loss_sum / n_img,
        "grad_norm": float(torch.sqrt(sum((g.double() ** 2).sum() for g in grad))),
        "lambda_max": top_eigenvalue(hvp, shapes, iters, device=device),
        "lambda_max_adam": top_eigenvalue(preconditioned(hvp, scale), shapes, iters, device=device),
        "adam_counts": sorted({second[n][0] for n in names}),
        "moments": "dormant_moments.pt (what warmup starts from)" if dormant else "the checkpoint's own",
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="prelora sharpness", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path,
                   help="a run directory with checkpoints/ (the run's config.yaml gives the model and the data)")
    p.add_argument("--step", type=int, default=None,
                   help="the checkpoint of this optimizer step (default: the run's latest complete checkpoint)")
    p.add_argument("--images", type=int, default=512, help="training images in the fixed batch (default: 512)")
    p.add_argument("--micro", type=int, default=128,
                   help="images per forward: bounds the memory, not the result (default: 128)")
    p.add_argument("--iters", type=int, default=60,
                   help="power iterations at most; it stops earlier once the estimate settles (default: 60)")
    p.add_argument("--json", type=Path, default=None,
                   help="also write the result to this file (default: printed on stdout only)")
    args = p.parse_args(argv)
    from prelora_ds.checkpoint import storage

    ckpt_dir = args.run_dir / "checkpoints"
    tags = storage.complete_tags(ckpt_dir) if ckpt_dir.is_dir() else []
    if not tags:
        raise CommandError(f"{ckpt_dir} holds no complete checkpoint")
    tag = storage.tag_for(args.step) if args.step is not None else tags[-1]
    if tag not in tags:
        raise CommandError(f"no complete checkpoint {tag} in {ckpt_dir}; there are: {', '.join(tags)}")
    result = measure(args.run_dir, tag, args.images, args.micro, args.iters)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0
