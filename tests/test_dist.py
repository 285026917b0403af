"""prelora_ds.dist on a default group that refuses CPU tensors (NCCL's device dispatch, made on this CPU)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys

import pytest
from conftest import ROOT, job_env

COLLECTIVES = {
    "all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast", "broadcast_object_list",
    "barrier", "monitored_barrier", "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single",
    "reduce", "gather", "gather_object", "scatter", "scatter_object_list", "send", "recv", "isend", "irecv",
}
COMM_MODULES = {"torch.distributed", "deepspeed.comm"}


def direct_collectives(source: str) -> list[int]:
    """Lines that call a collective of torch.distributed or deepspeed.comm, whatever name they are imported as."""
    tree = ast.parse(source)
    aliases = set(COMM_MODULES)  # dotted names that mean one of the comm modules
    direct = set()  # collectives imported by name
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.name in COMM_MODULES and a.asname}
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                if f"{node.module}.{a.name}" in COMM_MODULES:
                    aliases.add(a.asname or a.name)
                elif node.module in COMM_MODULES and a.name in COLLECTIVES:
                    direct.add(a.asname or a.name)
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Name) and f.id in direct:
            lines.append(node.lineno)
        elif isinstance(f, ast.Attribute) and f.attr in COLLECTIVES and ast.unparse(f.value) in aliases:
            lines.append(node.lineno)
    return lines


def run_ranks(out, world: int, port: int) -> list[dict]:
    procs = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "scripts" / "dist_check.py"), str(out)],
            cwd=ROOT,
            env={**job_env(), "RANK": str(r), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(port)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    for p in procs:
        log, _ = p.communicate(timeout=300)
        assert p.returncode == 0, log[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.mark.parametrize("world", [1, 2])
def test_package_collectives_on_a_cuda_only_default_group(tmp_path, world):
    facts = run_ranks(tmp_path, world, 29590 + world)
    for f in facts:
        # the group is NCCL-like: the direct all-reduce the package used to issue is refused
        assert f["default_group_error"] == "No backend type associated with device type cpu"
        assert f["sum"] == [sum(r + 1.0 for r in range(world)), 0.25 * world]
        assert f["max"] == [world - 1.0, 0.0]
        assert (f["agree_true"], f["agree_false"]) == (True, False)
        if world > 1:
            assert "ranks disagree on a forced disagreement" in f["disagree_message"]
        else:
            assert f["disagree_message"] is None  # one rank always agrees with itself
        # norms: exact to fp32 rounding, the frozen fp32 value counted once (not once per rank)
        assert f["norm_max_rel_err"] < 1e-5
        assert (f["loss_sum"], f["loss_count"]) == (sum(r + 1.0 for r in range(world)), 3.0 * world)
        assert f["lora_norm_max_rel_err"] < 1e-5
        c1, c5, n, loss = f["val_union_local"]
        assert f["val"] == pytest.approx({"top1": 100 * c1 / n, "top5": 100 * c5 / n, "loss": loss / n}, rel=1e-6)


def test_no_collective_outside_dist():
    """Every collective of the package and its tools goes through prelora_ds/dist.py (CPU tensors, gloo)."""
    offenders = []
    for path in [*(ROOT / "prelora_ds").glob("*.py"), *(ROOT / "tools").glob("*.py")]:
        if path.name == "dist.py":
            continue
        offenders += [f"{path.relative_to(ROOT)}:{i}" for i in direct_collectives(path.read_text())]
    assert not offenders, "collectives outside prelora_ds/dist.py:\n" + "\n".join(offenders)


def test_the_scan_finds_direct_collectives():
    found = direct_collectives(
        "import torch\nimport torch.distributed as dist\nfrom deepspeed import comm\n"
        "from torch.distributed import barrier as b\n"
        "dist.all_reduce(t)\ntorch.distributed.barrier()\ncomm.all_gather_object(x, y)\nb()\n"
    )
    assert found == [5, 6, 7, 8]
    assert direct_collectives("from prelora_ds import dist\ndist.barrier()\ndist.all_reduce_sum([1.0])\n") == []


def test_peak_memory_resets_per_phase():
    """What each phase reports as its peak: the CPU path (VmHWM) of what torch.cuda.reset_peak_memory_stats does."""
    import numpy as np

    from prelora_ds.monitor import memory_bytes, reset_peak_memory

    big = np.ones(400 * 2**20 // 8)
    big[::4096] = 2.0  # touched: resident
    del big
    before = memory_bytes()
    reset_peak_memory()
    assert memory_bytes() < before - 300 * 2**20
