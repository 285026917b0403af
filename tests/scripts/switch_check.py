"""Runs under a real launcher (2 CPU ranks, bf16 ZeRO-2): exercises Trainer.switch_to and writes facts; then
Adam's moments across the switch under every stage and dtype (moments_check.py), in the same launch.

Usage: deepspeed --num_gpus 2 tests/scripts/switch_check.py OUT_DIR
Each rank writes OUT_DIR/rank<R>.json (and moments_check's files); tests/integration/test_switch.py asserts on them.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import moments_check
import psutil
import torch

from prelora_ds.engine import norms
from prelora_ds.engine.model import create_model
from prelora_ds.engine.phase_engine import build_engine, gather_fp32_state, load_fp32_state, release
from prelora_ds.lora.inject import is_lora_param
from prelora_ds.testing.harness import fixed_batch, fixed_batch_loss, synthetic_trainer, tiny_vit


def mismatches(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in a if k in b and not torch.equal(a[k], b[k])]


def main(out: Path) -> None:
    trainer = synthetic_trainer(out / "run", model_kwargs=tiny_vit(depth=4, embed_dim=384, num_heads=6),
                                num_threads=1, prelora={"r_min": 8, "r_max": 64})
    rank, world = trainer.rank, trainer.world
    facts: dict = {"rank": rank, "world": world}

    images, targets = fixed_batch()
    for i in range(3):  # move the masters away from their bf16-representable initial values
        trainer.train_step([(images[4 * (i % 2) : 4 * (i % 2) + 4], targets[4 * (i % 2) : 4 * (i % 2) + 4])])

    # norms: all-reduced ZeRO-2 fragment sums == norms of the gathered full fp32 masters
    sampled, loss_sum, count = norms.sample(trainer.engine.module, trainer.phases.layout, {}, rank, 1.0 + rank, 2.0)
    before = gather_fp32_state(trainer.engine, trainer.phases.frozen_fp32)
    direct = {m: [float(before[f"{n}.weight"].double().norm()) for n in names]
              for m, names in trainer.phases.layout.modules.items()}
    facts["norms"] = sampled
    facts["norms_direct"] = direct
    facts["loss_sum"], facts["loss_count"] = loss_sum, count

    # the switch to warmup: masters bit for bit, function unchanged
    loss_before = fixed_batch_loss(trainer, images, targets)
    ranks = {n: 8 * 2 ** (i % 4) for i, n in enumerate(trainer.phases.layout.layers)}
    facts["switch_warmup_s"] = trainer.switch_to("warmup", ranks)
    after = gather_fp32_state(trainer.engine, trainer.phases.frozen_fp32)
    facts["warmup_mismatch"] = mismatches(before, after)
    facts["warmup_compared"] = len([k for k in before if k in after])
    facts["loss_before"], facts["loss_after"] = loss_before, fixed_batch_loss(trainer, images, targets)
    module = trainer.engine.module
    facts["warmup_frozen"] = [n for n, p in module.named_parameters() if not p.requires_grad]
    facts["warmup_lora_ranks"] = {
        n: module.base_model.model.get_submodule(n).lora_A["default"].out_features for n in ranks
    }
    facts["warmup_params"] = trainer.state.current.trainable_params

    # control: without writing the masters back, deepspeed.initialize keeps only the bf16-rounded values
    control_model = trainer.phases.make_model(after, trainer.state.phase, trainer.state.ranks)
    control = build_engine(control_model, trainer.ds_config, trainer.phases.wd)
    facts["control_mismatch"] = len(mismatches(after, gather_fp32_state(control, trainer.phases.frozen_fp32)))
    del control_model
    release(control)
    del control

    trainer.train_step([(images[:4], targets[:4])])
    before = gather_fp32_state(trainer.engine, trainer.phases.frozen_fp32)
    trainer.switch_to("lora")
    after = gather_fp32_state(trainer.engine, trainer.phases.frozen_fp32)
    facts["lora_mismatch"] = mismatches(before, after)
    module = trainer.engine.module
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    facts["lora_trainable_non_lora"] = [n for n in trainable if not is_lora_param(n)]
    facts["lora_trainable_count"] = sum(p.numel() for p in module.parameters() if p.requires_grad)
    facts["lora_params"] = trainer.state.current.trainable_params
    facts["lora_frozen_fp32_keys"] = len(trainer.phases.frozen_fp32)
    del module  # a module reference keeps its engine alive through the engine's hooks

    # frozen base after training: unchanged, and the export merges W_fp32 + s B A
    trainer.train_step([(images[4:], targets[4:])])
    after_step = gather_fp32_state(trainer.engine, trainer.phases.frozen_fp32)
    frozen_keys = list(trainer.phases.frozen_fp32)
    facts["frozen_changed"] = [k for k in frozen_keys if not torch.equal(after[k], after_step[k])]

    # memory: 5 more rebuilds, RSS after each (fresh model per rebuild keeps it flat)
    rss, engines = [], []
    for i in range(5):
        trainer.switch_to("warmup" if i % 2 == 0 else "lora")
        # before any collection of ours: the rebuild itself let the old engine go (an engine in a reference cycle
        # still referenced at its last gc.collect() waits for Python's next full collection, GiBs on ViT-H)
        engines.append(sum(type(o).__name__ == "DeepSpeedEngine" for o in gc.get_objects()))
        gc.collect()
        rss.append(psutil.Process().memory_info().rss)
    facts["rss"], facts["engines_after_rebuild"] = rss, engines
    facts["live_engines"] = sum(type(o).__name__ == "DeepSpeedEngine" for o in gc.get_objects())
    # a fresh model loads the gathered state exactly (the export path)
    fresh = create_model(trainer.cfg.model, 10)
    base = {k: v for k, v in after_step.items() if ".lora_" not in k}
    facts["fresh_missing"] = load_fp32_state(fresh, base)
    fresh_state = dict(fresh.named_parameters())
    facts["fresh_unused"] = sorted(set(base) - set(fresh_state))
    facts["fresh_compared"] = len([k for k in base if k in fresh_state])
    facts["fresh_mismatch"] = [k for k, p in fresh_state.items() if k in base and not torch.equal(p.detach(), base[k])]
    trainer.close()
    (out / f"rank{rank}.json").write_text(json.dumps(facts))
    moments_check.main(out)


if __name__ == "__main__":
    main(Path(next(a for a in sys.argv[1:] if not a.startswith("--"))))
    gc.freeze()  # no collections over every library's objects at exit (prelora_ds.train.cli)
