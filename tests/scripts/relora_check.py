"""Runs under a real launcher (2 CPU ranks, ZeRO-2): one ReLoRA merge in fp32 and one in bf16 (two trainers,
one after the other, in the same process pair), facts written per rank and precision.

Usage: deepspeed --num_gpus 2 tests/scripts/relora_check.py OUT_DIR
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

from prelora_ds.algorithm import policy
from prelora_ds.algorithm.policy import Clock
from prelora_ds.engine import moments
from prelora_ds.lora import relora
from prelora_ds.testing.harness import fixed_batch, synthetic_trainer, tiny_vit

MERGE_AFTER = 3  # steps before the merge
STEPS_AFTER = 4  # steps after it: 0, 1/2 of the LR (restart_warmup_steps 2), then the full LR twice


def lora_partition_states(engine) -> dict[str, int | bool]:
    """The LoRA Adam moments as they sit in this rank's flat ZeRO partitions (the optimizer's own tensors)."""
    base = engine.optimizer.optimizer
    storages = {state[k].untyped_storage().data_ptr() for state in base.state.values() for k in relora.ADAM_KEYS}
    facts = {"entries": 0, "m_zero": 0, "m_without_v": 0, "in_partitions": True}
    for name, p in engine.module.named_parameters():
        mapping = getattr(p, "_hp_mapping", None)
        if ".lora_" not in name or mapping is None:
            continue
        m, v = mapping.get_hp_fragment("exp_avg"), mapping.get_hp_fragment("exp_avg_sq")
        facts["in_partitions"] &= all(t.untyped_storage().data_ptr() in storages for t in (m, v))
        facts["entries"] += m.numel()
        facts["m_zero"] += int((m == 0).sum())
        facts["m_without_v"] += int(((m != 0) & (v == 0)).sum())
    return facts


def second_moments(engine) -> dict[str, torch.Tensor]:
    return {n: safe_get_full_optimizer_state(p, "exp_avg_sq").float().clone()
            for n, p in engine.module.named_parameters() if ".lora_" in n and p.requires_grad}


def evaluate(engine, images: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, float]:
    """(fp32 logits, mean cross-entropy) of the fixed batch in eval mode (no dropout, no drop path)."""
    engine.eval()
    with torch.no_grad():
        logits = engine(images.to(dtype)).float()
    engine.train()
    return logits, float(F.cross_entropy(logits, targets))


def train(trainer, images: torch.Tensor, targets: torch.Tensor, steps: int) -> None:
    """`steps` optimizer steps on the two halves of the fixed batch, in turn (each rank takes 4 images)."""
    for _ in range(steps):
        i = trainer.state.step % 2
        trainer.train_step([(images[4 * i : 4 * i + 4], targets[4 * i : 4 * i + 4])])


def check(out: Path, precision: str) -> tuple[dict, int]:
    trainer = synthetic_trainer(
        out / precision / "run", model_kwargs=tiny_vit(depth=2, embed_dim=128, num_heads=2),
        ds_config=f"ds_configs/cpu_zero2_{precision}.json", num_threads=1,
        relora={"enabled": True, "start_step": 0, "rank": 16, "merge_every_steps": MERGE_AFTER, "prune_ratio": 0.9,
                "restart_warmup_steps": 2},
    )
    rank = trainer.rank
    dtype = trainer.phases.dtype
    trainer.switch_to("relora", {n: 16 for n in trainer.phases.layout.layers})
    kept_copies = len(trainer.phases.frozen_fp32)  # the frozen base's fp32 copy beside the engine
    images, targets = fixed_batch()
    _, loss_start = evaluate(trainer.engine, images, targets, dtype)
    train(trainer, images, targets, MERGE_AFTER)
    engine = trainer.engine
    layer = engine.module.base_model.model.blocks[0].attn.qkv
    a_before = layer.lora_A["default"].weight.detach().float().clone()
    b_norm_before = float(layer.lora_B["default"].weight.detach().float().norm())
    base_before = trainer.phases.fp32_state()["blocks.0.attn.qkv.weight"].clone()  # collective
    moments.link_state(engine.optimizer)
    v_before = second_moments(engine)
    logits_before, loss_before = evaluate(engine, images, targets, dtype)
    # the merge exactly as the loop runs it (state.step == start + every)
    assert policy.merge_due(trainer.state.step, 0, MERGE_AFTER)
    trainer.control.after_step(trainer.state, Clock(trainer.state.step, trainer.state.epoch))
    logits_after, loss_after = evaluate(engine, images, targets, dtype)
    v_after = second_moments(engine)
    base_after = trainer.phases.fp32_state()["blocks.0.attn.qkv.weight"]
    facts = {
        "kept_copies": kept_copies,
        "merges": trainer.state.relora_merges,
        "b_norm_before": b_norm_before,
        "b_after_max": float(safe_get_full_fp32_param(layer.lora_B["default"].weight).abs().max()),
        "a_changed": not torch.equal(a_before, layer.lora_A["default"].weight.detach().float()),
        "a_master_equals_module": torch.equal(
            safe_get_full_fp32_param(layer.lora_A["default"].weight).to(layer.lora_A["default"].weight.dtype),
            layer.lora_A["default"].weight.detach(),
        ),
        "base_moved": float((base_after - base_before).abs().max()),
        "logits_max_abs_diff": float((logits_after - logits_before).abs().max()),
        "logits_max_abs": float(logits_before.abs().max()),
        "loss_start": loss_start,
        "loss_before": loss_before,
        "loss_after": loss_after,
        "v_kept": all(torch.equal(v_before[n], v_after[n]) for n in v_before),
        "partitions": lora_partition_states(engine),
        "a_rank0": layer.lora_A["default"].weight.detach().float()[:2, :4].tolist(),
    }
    # training goes on from the merged state at the real restart schedule: B moves off zero, the loss on the
    # fixed batch keeps what the pre-merge steps gained (a broken Adam reset throws it away in one step)
    train(trainer, images, targets, STEPS_AFTER)
    facts["b_after_steps"] = float(safe_get_full_fp32_param(layer.lora_B["default"].weight).abs().max())
    _, facts["loss_after_steps"] = evaluate(engine, images, targets, dtype)
    trainer.close()
    return facts, rank


def main(out: Path) -> None:
    facts = {}
    for precision in ("fp32", "bf16"):
        facts[precision], rank = check(out, precision)
    (out / f"rank{rank}.json").write_text(json.dumps(facts))


if __name__ == "__main__":
    main(Path(next(a for a in sys.argv[1:] if not a.startswith("--"))))
    gc.freeze()  # no collections over every library's objects at exit (prelora_ds.train.cli)
