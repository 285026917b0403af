"""Runs under a real launcher (2 CPU ranks): Adam's moments across the engine switch, per ZeRO stage and dtype.

Usage: deepspeed --num_gpus 2 tests/scripts/moments_check.py OUT_DIR
       python tests/scripts/moments_check.py OUT_DIR --universal     (afterwards, one process)
For each configuration: steps of `full`, the switch to `warmup` (moments read out of the old engine and out of the
new one, compared bit for bit), one step, a checkpoint and a resume into a new Trainer (moments compared again),
the freeze to `lora`. The fixed-batch loss is recorded after every step. `zero2_fp32_reset` is the control with a
fresh optimizer at the switch. Each rank writes OUT_DIR/<config>.rank<R>.json; `--universal` resumes each
checkpoint on 1 rank (DeepSpeed's universal format; stage 0's as saved) and writes OUT_DIR/<config>.universal.json.
tests/integration/test_switch.py asserts on them.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import torch

from prelora_ds.engine import moments
from prelora_ds.testing.harness import fixed_batch, fixed_batch_loss, synthetic_trainer, tiny_vit
from prelora_ds.training.trainer import Trainer

MODEL = tiny_vit(depth=2, embed_dim=64, num_heads=2)
# Each stage's state layout and each dtype once (ZeRO-2/3 keep fp32 partitions either way; the two cells
# left out, zero2_bf16 and zero3_fp32, read and write through the same code as these and cost 25 s of CI)
CONFIGS = {  # name -> (DeepSpeed config, top-level changes, prelora.switch_optimizer)
    "zero2_fp32": ("ds_configs/cpu_zero2_fp32.json", {}, "carry"),
    "zero3_bf16": ("ds_configs/cpu_zero3_fp32.json", {"bf16": {"enabled": True}}, "carry"),
    "zero0_fp32": ("ds_configs/cpu_zero2_fp32.json", {"zero_optimization": {"stage": 0}}, "carry"),  # torch AdamW
    "zero2_fp32_reset": ("ds_configs/cpu_zero2_fp32.json", {}, "reset"),
}
FULL_STEPS = 12
GLOBAL_BATCH = 8  # 4 images x 2 ranks; on 1 rank 4 x 2 accumulation


def build(run: Path, name: str, resume: bool = False, **sections: dict) -> Trainer:
    """The trainer of configuration `name` in run/run (`resume`: from its last checkpoint); `sections` add recipe
    sections."""
    ds_config, changes, mode = CONFIGS[name]
    return synthetic_trainer(
        run / "run", model_kwargs=MODEL, ds_config=ds_config, ds_changes=changes, global_batch=GLOBAL_BATCH,
        resume=resume, num_threads=1, prelora={"switch_optimizer": mode},
        train={"epochs": 10, "seed": 0, "lr_warmup_steps": 0}, **sections,
    )


def compare(a: moments.Moments, b: moments.Moments) -> list[str]:
    """Names whose step count or any moment differs (bit for bit) between two reads; names missing from b too."""
    bad = []
    for name, (count, values) in a.items():
        if name not in b or b[name][0] != count or any(not torch.equal(v, b[name][1][k]) for k, v in values.items()):
            bad.append(name)
    return bad


def update_norm(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    """The norm of one step's change of the base weights (the parameters trained before and after the switch)."""
    return float(sum(float((after[k] - before[k]).double().pow(2).sum()) for k in before if ".lora_" not in k) ** 0.5)


def layout(trainer: Trainer) -> list[list]:
    """Each optimizer group's (Adam count carried in, revived, timm's lr_scale, elements: of this rank's flat
    partition under ZeRO)."""
    return [[g.get(moments.COUNT), bool(g.get(moments.REVIVED)), g.get("lr_scale"), sum(p.numel() for p in g["params"])]
            for g in trainer.engine.optimizer.param_groups]  # fmt: skip


def warmup_step(trainer: Trainer, images: torch.Tensor, targets: torch.Tensor) -> dict:
    """One step of warmup: the revived names, the group layout with each group's LR, and the values before and
    after of the base (revived) and the change of every other parameter."""
    w0 = trainer.phases.fp32_state()
    trainer.train_step([(images[:4], targets[:4])])
    w1 = trainer.phases.fp32_state()
    revived = sorted(trainer.phases.revived)
    groups = [[*row, g["lr"]] for row, g in zip(layout(trainer), trainer.engine.optimizer.param_groups, strict=True)]
    return {"revived": revived, "groups": groups,
            "base": ({n: w0[n] for n in revived}, {n: w1[n] for n in revived}),
            "other": {n: w1[n] - w0[n] for n in w1 if n not in trainer.phases.revived and n in w0}}  # fmt: skip


def check(out: Path, name: str) -> dict:
    trainer = build(out / name, name)
    rank = trainer.rank
    train_images, train_targets = fixed_batch(16)
    batches = [(train_images[i : i + 4], train_targets[i : i + 4]) for i in range(0, 16, 4)]
    images, targets = train_images, train_targets
    facts: dict = {"losses": [fixed_batch_loss(trainer, images, targets)], "update_norms": []}
    for i in range(FULL_STEPS):
        w0 = trainer.phases.fp32_state()
        trainer.train_step([batches[i % 4]])
        facts["update_norms"].append(update_norm(w0, trainer.phases.fp32_state()))
        facts["losses"].append(fixed_batch_loss(trainer, images, targets))

    before = moments.gather(trainer.engine)
    ranks = {n: 8 for n in trainer.phases.layout.layers}
    trainer.switch_to("warmup", ranks)
    after = moments.gather(trainer.engine)  # what the new engine holds before its first step
    facts["full_params"] = sorted(before)
    facts["full_counts"] = sorted({c for c, _ in before.values()})
    facts["warmup_carried"] = sorted(after)
    facts["warmup_mismatch"] = compare(before, after)
    facts["loss_at_switch"] = fixed_batch_loss(trainer, images, targets)
    w0 = trainer.phases.fp32_state()
    trainer.train_step([batches[FULL_STEPS % 4]])
    facts["switch_update_norm"] = update_norm(w0, trainer.phases.fp32_state())
    facts["loss_after_switch_step"] = fixed_batch_loss(trainer, images, targets)
    stepped = moments.gather(trainer.engine)
    facts["counts_after_step"] = {n: c for n, (c, _) in stepped.items()}
    facts["lora_exp_avg_sq_max"] = max(  # a fresh factor's moments after one step: (1 - beta2) g^2 only
        float(v["exp_avg_sq"].abs().max()) for n, (_, v) in stepped.items() if ".lora_" in n
    )

    trainer.save_checkpoint()
    if rank == 0:
        torch.save(stepped, out / f"{name}.saved.pt")
    trainer.close()
    resumed = build(out / name, name, resume=True)
    facts["resume_phase"] = resumed.state.phase
    facts["resume_mismatch"] = compare(stepped, moments.gather(resumed.engine))
    facts["resume_loss"] = fixed_batch_loss(resumed, images, targets)

    before = moments.gather(resumed.engine)
    if rank == 1:  # a universal load leaves each rank's state keys in the listdir order of its first parameter
        inner = moments._inner(resumed.engine.optimizer)
        for key, state in list(inner.state.items()):
            inner.state[key] = dict(reversed(state.items()))
    facts["key_order_mismatch"] = compare(before, moments.gather(resumed.engine))
    resumed.switch_to("lora")
    after = moments.gather(resumed.engine)
    facts["lora_carried"] = sorted(after)
    facts["lora_mismatch"] = compare({n: before[n] for n in after if n in before}, after)
    facts["lora_trainable"] = sorted(n for n, p in resumed.engine.module.named_parameters() if p.requires_grad)
    resumed.close()
    (out / f"{name}.rank{rank}.json").write_text(json.dumps(facts))
    return facts


def check_relora(out: Path, name: str) -> dict:
    """full -> relora (the base freezes: its moments are kept aside), a checkpoint and a resume in relora, then
    relora -> warmup (the base trains again and takes them up)."""
    # the switches are made by hand here; the base revived in warmup trains at 0.1 of the LR at its first step, rising
    # to 1.0 across warmup (the control: 1.0 throughout)
    relora = {"enabled": True, "start_step": 1000, "rank": 8, "warmup_base_lr_scale": 0.1, "warmup_base_lr_ramp": True}
    run = out / f"{name}_relora"
    trainer = build(run, name, relora=relora)
    rank = trainer.rank
    images, targets = fixed_batch(16)
    for i in range(6):
        trainer.train_step([(images[4 * (i % 4) : 4 * (i % 4) + 4], targets[4 * (i % 4) : 4 * (i % 4) + 4])])
    full = moments.gather(trainer.engine)
    trainer.switch_to("relora", {n: 8 for n in trainer.phases.layout.layers})
    kept = dict(trainer.phases.dormant)
    for i in range(2):
        trainer.train_step([(images[4 * i : 4 * i + 4], targets[4 * i : 4 * i + 4])])
    trainer.save_checkpoint()
    trainer.close()
    # the control: the same resume and first step of warmup with the base at the schedule's own LR
    flat = {**relora, "warmup_base_lr_scale": 1.0, "warmup_base_lr_ramp": False}
    control = build(run, name, resume=True, relora=flat)
    control.switch_to("warmup", {n: 16 for n in control.phases.layout.layers}, merge_lora=True)
    control_step = warmup_step(control, images, targets)
    control.close()
    resumed = build(run, name, resume=True, relora=relora)
    facts = {"frozen_in_relora": sorted(n for n, p in resumed.engine.module.named_parameters() if not p.requires_grad),
             "kept": sorted(kept), "kept_keys": sorted({k for _, m in kept.values() for k in m}),
             "kept_vs_full": compare({n: full[n] for n in kept}, kept),
             "resume_mismatch": compare(kept, resumed.phases.dormant)}  # fmt: skip
    relora_state = moments.gather(resumed.engine)
    resumed.switch_to("warmup", {n: 16 for n in resumed.phases.layout.layers}, merge_lora=True)
    warmup = moments.gather(resumed.engine)
    facts["warmup_base_vs_kept"] = compare(kept, warmup)
    facts["warmup_extras_vs_relora"] = compare({n: m for n, m in relora_state.items() if ".lora_" not in n}, warmup)
    facts["warmup_fresh"] = sorted(n for n, p in resumed.engine.module.named_parameters()
                                   if p.requires_grad and n.replace("base_model.model.", "").replace(".base_layer", "")
                                   not in warmup)  # fmt: skip
    step = warmup_step(resumed, images, targets)
    facts["scale"] = resumed.cfg.relora.warmup_base_lr_scale
    facts["revived"] = step["revived"]
    facts["groups"] = step["groups"]
    facts["lr"] = resumed.last_lr
    facts["base_update_ratio"] = update_norm(*step["base"]) / update_norm(*control_step["base"])
    other, control_other = step["other"], control_step["other"]
    facts["other_update_mismatch"] = [n for n, d in other.items() if not torch.equal(d, control_other[n])]
    facts["other_updated"] = sum(bool(d.any()) for d in step["other"].values())
    facts["warmup_steps"] = resumed.phases.warmup_phase_steps
    facts["second_groups"] = warmup_step(resumed, images, targets)["groups"]  # the ramp's second step
    facts["second_lr"] = resumed.last_lr
    resumed.save_checkpoint()
    resumed.close()
    again = build(run, name, resume=True, relora=relora)  # a resume in warmup builds the same groups
    facts["resume_phase"] = again.state.phase
    facts["resume_groups"] = layout(again)
    again.train_step([(images[:4], targets[:4])])  # the third step of warmup, after the resume
    facts["resume_step_groups"] = [g["lr_scale"] for g in moments.revived_groups(again.engine.optimizer)]
    again.close()
    (out / f"{name}_relora.rank{rank}.json").write_text(json.dumps(facts))
    return facts


def check_universal(out: Path, name: str) -> None:
    """Resume the 2-rank checkpoint taken one step after the switch on this 1-rank process."""
    trainer = build(out / name, name, resume=True)
    saved = torch.load(out / f"{name}.saved.pt")
    facts = {"world": trainer.world, "phase": trainer.state.phase,
             "mismatch": compare(saved, moments.gather(trainer.engine)), "compared": len(saved)}
    trainer.close()
    (out / f"{name}.universal.json").write_text(json.dumps(facts))


def main(out: Path, universal: bool = False) -> None:
    for name in CONFIGS:
        if not universal:
            check(out, name)
            if name in ("zero2_fp32", "zero3_bf16"):
                check_relora(out, name)
        elif CONFIGS[name][2] == "carry":
            check_universal(out, name)


if __name__ == "__main__":
    main(Path(next(a for a in sys.argv[1:] if not a.startswith("--"))), "--universal" in sys.argv)
    gc.freeze()  # no collections over every library's objects at exit (prelora_ds.train.cli)
