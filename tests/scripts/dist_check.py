"""The package's collectives on a default group that takes no CPU tensors, as NCCL's does on a GPU cluster.

The default group is started as `cuda:gloo`: a backend for CUDA tensors only, the device dispatch of an
NCCL group, on this CPU. Every function of prelora_ds.distributed.collectives and the code paths that reduce through it
(a norm sample, the LoRA norms, the validation counts) run on it; facts go to OUT/rank<R>.json.

Usage (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set): python tests/scripts/dist_check.py OUT
"""

from __future__ import annotations

import gc
import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as tdist

from prelora_ds.config.sections import PreLoRAConfig
from prelora_ds.distributed import collectives
from prelora_ds.engine import norms
from prelora_ds.lora.inject import PHASES, build_structure, target_layers
from prelora_ds.training.validation import TopKCounts

TARGETS = r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc[12])"


def tiny_vit() -> torch.nn.Module:
    import timm

    torch.manual_seed(0)  # the same weights on every rank
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=16, patch_size=4, depth=2, embed_dim=64,
        num_heads=2,
    )


def main(out: Path) -> None:
    tdist.init_process_group("cuda:gloo", timeout=timedelta(seconds=120))
    rank, world = tdist.get_rank(), tdist.get_world_size()
    facts: dict = {"rank": rank, "world": world}
    try:  # what every call of the package used to do: a CPU tensor on the default group
        tdist.all_reduce(torch.ones(1))
        facts["default_group_error"] = None
    except RuntimeError as exc:
        facts["default_group_error"] = str(exc).splitlines()[0]

    facts["sum"] = collectives.all_reduce_sum([rank + 1.0, 0.25])
    facts["max"] = collectives.all_reduce_max([float(rank), -float(rank)])
    facts["agree_true"], facts["agree_false"] = collectives.agree(True, "t"), collectives.agree(False, "f")
    try:
        collectives.agree(rank == 0, "a forced disagreement")
        facts["disagree_message"] = None
    except RuntimeError as exc:
        facts["disagree_message"] = str(exc)
    facts["gathered"] = collectives.all_gather_object({"rank": rank, "files": [f"rank{rank}.pt"]})
    collectives.barrier()
    try:  # a rebuild's bulk broadcast goes on the training group, so it needs the accelerator's device (engine/stream)
        collectives.broadcast_tensor(torch.ones(2) if rank == 0 else None, 0, torch.Size([2]), torch.device("cpu"))
        facts["bulk_broadcast_error"] = None
    except RuntimeError as exc:
        facts["bulk_broadcast_error"] = str(exc).splitlines()[0]

    # a norm sample as in `full`: plain parameters (no ZeRO fragments), counted once (rank 0), frozen fp32 used
    model = tiny_vit()
    layout = norms.NormLayout.from_layers(target_layers(model, TARGETS))
    first = layout.layers[0] + ".weight"
    frozen = {first: 2 * model.get_submodule(layout.layers[0]).weight.detach()}
    sampled, loss_sum, count = norms.sample(model, layout, frozen, rank, loss_sum=rank + 1.0, loss_count=3.0)
    expected = {
        m: [float((frozen.get(f"{n}.weight", model.get_submodule(n).weight)).detach().norm()) for n in names]
        for m, names in layout.modules.items()
    }
    facts["norm_max_rel_err"] = max(
        abs(a - b) / b for m in expected for a, b in zip(sampled[m], expected[m], strict=True)
    )
    facts["loss_sum"], facts["loss_count"] = loss_sum, count

    # base / LoRA / effective norms after the switch: layers dealt round-robin over ranks
    lora = build_structure(tiny_vit(), PHASES["warmup"], {n: 8 for n in layout.layers}, PreLoRAConfig())
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    values, _, _ = norms.lora_norms(lora, layout, {}, rank, world)
    inner = lora.base_model.model
    err = 0.0
    for n in layout.layers:
        layer = inner.get_submodule(n)
        w = layer.base_layer.weight.detach()
        d = layer.scaling["default"] * (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach()
        for kind, ref in (("base", w.norm()), ("lora", d.norm()), ("effective", (w + d).norm())):
            err = max(err, abs(values[n][kind] - float(ref)) / float(ref))
    facts["lora_norm_max_rel_err"] = err

    # validation counts: each rank scores its own share; the reduced result must equal the union's
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(world * 6, 10, generator=gen)
    targets = torch.randint(0, 10, (world * 6,), generator=gen)
    loss_fn = torch.nn.CrossEntropyLoss()
    mine = TopKCounts()
    mine.add(logits[rank * 6 : rank * 6 + 6], targets[rank * 6 : rank * 6 + 6], loss_fn)
    facts["val"] = mine.reduce()
    union = TopKCounts()
    union.add(logits, targets, loss_fn)
    facts["val_union_local"] = union.counts.tolist()
    tdist.destroy_process_group()
    (out / f"rank{rank}.json").write_text(json.dumps(facts))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(Path(sys.argv[1]))
    gc.freeze()  # no collections over every library's objects at exit (prelora_ds.train.cli)
