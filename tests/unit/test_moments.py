"""The optimizer groups of an engine built after a rebuild: weight-decay groups split by each parameter's Adam
step count, so that one flat ZeRO partition never mixes two bias corrections."""

from __future__ import annotations

import torch

from prelora_ds.config.sections import ModelConfig, PreLoRAConfig
from prelora_ds.engine.model import create_model, param_groups
from prelora_ds.engine.moments import COUNT, REVIVED
from prelora_ds.engine.moments import param_groups as split_groups
from prelora_ds.engine.schedule import build_scheduler, set_lr
from prelora_ds.lora.inject import PHASES, build_structure, canonical_name

TINY = ModelConfig(name="vit_tiny_patch16_224", kwargs={"img_size": 16, "patch_size": 4, "depth": 2})


def warmup_model():
    model = create_model(TINY, 10)
    return build_structure(model, PHASES["warmup"], {f"blocks.{i}.attn.qkv": 8 for i in range(2)}, PreLoRAConfig())


def names(model, group):
    by_id = {id(p): canonical_name(n) for n, p in model.named_parameters()}
    return [by_id[id(p)] for p in group["params"]]


def test_without_counts_the_groups_are_the_weight_decay_groups():
    model = warmup_model()
    plain, split = param_groups(model, 0.05), split_groups(model, 0.05, None)
    assert [[id(p) for p in g["params"]] for g in plain] == [[id(p) for p in g["params"]] for g in split]
    assert all(COUNT not in g for g in split)


def test_groups_split_by_count_within_each_weight_decay_group():
    model = warmup_model()
    counts = {canonical_name(n): 176 for n, _ in model.named_parameters() if ".lora_" not in n}
    counts["head.weight"] = counts["head.bias"] = 200  # a third history (e.g. trained on through relora)
    groups = split_groups(model, 0.05, counts)
    trainable = {canonical_name(n) for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(n for g in groups for n in names(model, g)) == sorted(trainable)  # each parameter once
    for g in groups:
        assert {counts.get(n, 0) for n in names(model, g)} == {g[COUNT]}  # one history per group
    by_decay = {}
    for g in groups:
        by_decay.setdefault(g["weight_decay"], []).append(g[COUNT])
    assert by_decay == {0.0: [200, 176], 0.05: [200, 176, 0]}  # LoRA factors (decayed matrices) start fresh
    again = split_groups(warmup_model(), 0.05, counts)  # a resume builds the layout its checkpoint has
    assert [(g[COUNT], g["weight_decay"], len(g["params"])) for g in again] == [
        (g[COUNT], g["weight_decay"], len(g["params"])) for g in groups]


def test_revived_base_gets_its_own_groups_with_timms_lr_scale():
    """relora -> warmup: the base (frozen through relora) is split from the head, norms and LoRA factors that
    trained on, with or without carried counts, and only its groups carry the `lr_scale` timm's schedulers apply."""
    model = warmup_model()
    revived = frozenset(canonical_name(n) for n, p in model.named_parameters()
                        if p.requires_grad and ".lora_" not in n and not n.startswith("base_model.model.head")
                        and ".norm" not in n and not n.startswith("base_model.model.norm"))  # fmt: skip
    for counts in (None, {n: 176 for n in revived}):  # reset / carry (the base's kept moments)
        groups = split_groups(model, 0.05, counts, revived, 0.1)
        for g in groups:
            members = set(names(model, g))
            assert members <= revived if g.get(REVIVED) else not members & revived
            assert g.get("lr_scale") == (0.1 if g.get(REVIVED) else None)
        assert sorted(n for g in groups for n in names(model, g)) == sorted(
            canonical_name(n) for n, p in model.named_parameters() if p.requires_grad)
    sched = build_scheduler(torch.optim.AdamW(groups, lr=1e-3), 100, 10, 1e-5)
    lr = set_lr(sched, 50)  # the schedule's value (what train/lr logs), not the revived base's
    plain = build_scheduler(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3), 100, 10, 1e-5)
    assert lr == set_lr(plain, 50)
    assert [g["lr"] for g in sched.optimizer.param_groups] == [
        lr * 0.1 if g.get(REVIVED) else lr for g in sched.optimizer.param_groups]
