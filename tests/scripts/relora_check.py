"""Runs under a real launcher (2 CPU ranks, bf16 ZeRO-2): one ReLoRA merge, facts written per rank.

Usage: deepspeed --num_gpus 2 tests/scripts/relora_check.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from tiny_trainer import fixed_batch, tiny_trainer

from prelora_ds import relora


def lora_partition_states(engine) -> tuple[int, int, bool]:
    """Zeros among the LoRA Adam moments in this rank's flat ZeRO partitions (the optimizer's own tensors)."""
    base = engine.optimizer.optimizer
    storages = {state[k].untyped_storage().data_ptr() for state in base.state.values() for k in relora.ADAM_KEYS}
    zeros = total = 0
    in_partitions = True
    for name, p in engine.module.named_parameters():
        mapping = getattr(p, "_hp_mapping", None)
        if ".lora_" not in name or mapping is None:
            continue
        for key in relora.ADAM_KEYS:
            frag = mapping.get_hp_fragment(key)
            in_partitions &= frag.untyped_storage().data_ptr() in storages
            zeros += int((frag == 0).sum())
            total += frag.numel()
    return zeros, total, in_partitions


def main(out: Path) -> None:
    trainer, rank, world = tiny_trainer(
        out, {"depth": 2, "embed_dim": 128, "num_heads": 2},
        relora={"enabled": True, "start_step": 0, "rank": 16, "merge_every_steps": 3, "prune_ratio": 0.9},
    )
    trainer.switch_to("relora", {n: 16 for n in trainer.layout.layers})
    images, targets = fixed_batch()
    for i in range(3):
        trainer.train_step([(images[4 * (i % 2) : 4 * (i % 2) + 4], targets[4 * (i % 2) : 4 * (i % 2) + 4])])
        trainer.state.step += 1
    engine = trainer.engine
    layer = engine.module.base_model.model.blocks[0].attn.qkv
    a_before = layer.lora_A["default"].weight.detach().float().clone()
    b_norm_before = float(layer.lora_B["default"].weight.detach().float().norm())
    base_before = trainer.frozen_fp32["blocks.0.attn.qkv.weight"].clone()
    engine.eval()
    with torch.no_grad():
        out_before = engine(images.to(torch.bfloat16)).float()
    # the merge exactly as the loop runs it (state.step == start + every)
    assert relora.merge_due(trainer.state.step, 0, 3)
    trainer._maybe_merge()
    with torch.no_grad():
        out_after = engine(images.to(torch.bfloat16)).float()
    engine.train()
    zeros, total, in_partitions = lora_partition_states(engine)
    from deepspeed.utils import safe_get_full_fp32_param

    facts = {
        "merges": trainer.state.relora_merges,
        "b_norm_before": b_norm_before,
        "b_after_max": float(safe_get_full_fp32_param(layer.lora_B["default"].weight).abs().max()),
        "a_changed": not torch.equal(a_before, layer.lora_A["default"].weight.detach().float()),
        "a_master_equals_module": torch.equal(
            safe_get_full_fp32_param(layer.lora_A["default"].weight).to(torch.bfloat16),
            layer.lora_A["default"].weight.detach(),
        ),
        "base_moved": float((trainer.frozen_fp32["blocks.0.attn.qkv.weight"] - base_before).abs().max()),
        "out_max_abs_diff": float((out_after - out_before).abs().max()),
        "out_max_abs": float(out_before.abs().max()),
        "partition_zero_share": zeros / max(total, 1),
        "partition_entries": total,
        "read_from_partitions": in_partitions,
        "a_rank0": layer.lora_A["default"].weight.detach().float()[:2, :4].tolist(),
    }
    # the next steps train from the merged state: loss stays finite and B moves off zero
    trainer.train_step([(images[:4], targets[:4])])
    facts["b_after_step"] = float(safe_get_full_fp32_param(layer.lora_B["default"].weight).abs().max())
    trainer.close()
    (out / f"rank{rank}.json").write_text(json.dumps(facts))


if __name__ == "__main__":
    main(Path(next(a for a in sys.argv[1:] if not a.startswith("--"))))
